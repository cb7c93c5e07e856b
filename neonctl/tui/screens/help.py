"""`?`: every key binding of the app and the screen below, in one table."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

GLOBAL_HELP = [("←/→", "previous/next layer in key order"), ("↑/↓", "newer/older layer"),
               ("click", "select the layer under the mouse"), ("tab", "move focus")]


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss(None)", "Close")]

    def __init__(self, bindings: list[tuple[str, str]]) -> None:
        super().__init__(id="help")
        self.bindings = bindings

    def compose(self) -> ComposeResult:
        rows = [f"[b]{k:>14}[/b]  {d}" for k, d in GLOBAL_HELP + self.bindings]
        with VerticalScroll(id="help-box"):
            yield Static("[b]neonctl tui — key bindings[/b]\n\n" + "\n".join(rows) + "\n\n(esc closes)")
