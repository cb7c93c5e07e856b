"""The selected layer's details: every `layers` column, the relations it covers and commit times."""

from __future__ import annotations

from rich.table import Table
from textual.widgets import Static

from neonctl.engine.lsn import format_lsn

_FIELDS = [("kind", "kind"), ("level", "level"), ("owner", "owner"), ("lsn_range", "LSN range"),
           ("time_start", "at start"), ("time_end", "at end"), ("file_size", "bytes"), ("num_values", "values"),
           ("compression", "compression"), ("key_start", "key start"), ("key_end", "key end")]


def _bound(d: dict, side: str) -> str:
    rel = d.get(f"{side}_rel")
    if rel is None:
        return d.get(f"{side}_space") or ""
    blk = d.get(f"{side}_block")
    return f"{rel} {d.get(f'{side}_fork')} " + ("size" if blk is None else f"blk {blk}")


class LayerDetails(Static):
    def show(self, details: dict | None) -> None:
        self.details = details
        if details is None:
            self.update("no layer selected")
            return
        t = Table.grid(padding=(0, 1))
        t.add_column(style="bold")
        t.add_column()
        for key, label in _FIELDS:
            v = details.get(key)
            if key == "owner":
                v = f"{v} (inherited)" if details.get("inherited") else v
            elif key in ("file_size", "num_values") and v is not None:
                v = f"{v:,}"
            t.add_row(label, "" if v is None else str(v))
        t.add_row("from", _bound(details, "start"))
        t.add_row("to", _bound(details, "end"))
        rels = details.get("relations", [])
        names = ", ".join(r["name"] for r in rels[:12]) + (f" … +{len(rels) - 12}" if len(rels) > 12 else "")
        t.add_row("relations", names or "(none named)")
        t.add_row("file", details["name"])
        self.border_title = f"layer {format_lsn(details['lsn_start'])}"
        self.update(t)
