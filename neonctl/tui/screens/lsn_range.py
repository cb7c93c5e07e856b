"""Zoom the map into an LSN range typed as `X/Y..X/Y`."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label

from neonctl.engine.lsn import parse_lsn
from neonctl.errors import InvalidInput


def parse_range(text: str) -> tuple[int, int]:
    a, sep, b = text.partition("..")
    if not sep:
        raise InvalidInput("expected FROM..TO, e.g. 0/1600000..0/3000000")
    lo, hi = parse_lsn(a), parse_lsn(b)
    if lo >= hi:
        raise InvalidInput("the range is empty: FROM must be below TO")
    return lo, hi


class LsnRangeScreen(ModalScreen[tuple[int, int] | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(id="lsn-range"):
            yield Input(placeholder="FROM..TO  (e.g. 0/1600000..0/3000000)", id="range")
            yield Label("", id="range-error")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    @on(Input.Submitted)
    def submit(self, event: Input.Submitted) -> None:
        try:
            self.dismiss(parse_range(event.value))
        except InvalidInput as e:
            self.query_one("#range-error", Label).update(str(e))
