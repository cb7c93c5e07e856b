"""The message panel: daemon states, and a clear warning when they are stopped (the map is then the
stored metadata, read-only)."""

from __future__ import annotations

from textual.widgets import Static

from neonctl.engine.explorer.metadata import StorageSnapshot


class StatusPanel(Static):
    def show(self, snap: StorageSnapshot | None, error: str | None = None) -> None:
        if error:
            self.set_class(True, "-stopped")
            self.update(f"[b]refresh failed[/b]\n{error}")
            return
        if snap is None:
            return
        stopped = not snap.pageserver_running
        self.set_class(stopped, "-stopped")
        lines = []
        if stopped:
            lines.append("[b]daemons stopped[/b]: showing the stored metadata read-only; `neonctl start` to go live")
        lines.append("  ".join(f"{d['name']} {'●' if d['state'] == 'running' else '○'}" for d in snap.daemons))
        lines += [f"· {n}" for n in snap.notes]
        self.update("\n".join(lines))
