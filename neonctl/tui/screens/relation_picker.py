"""Pick a relation by name to zoom the map into its key range: a filter box over an option list."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, OptionList
from textual.widgets.option_list import Option


class RelationPicker(ModalScreen[dict | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, relations: list[dict]) -> None:
        super().__init__(id="relation-picker")
        self.relations = relations

    def compose(self) -> ComposeResult:
        with Vertical(id="picker"):
            yield Input(placeholder="relation name (type to filter, enter picks)", id="filter")
            yield OptionList(id="relations")

    def on_mount(self) -> None:
        self.fill("")
        self.query_one(Input).focus()

    def fill(self, text: str) -> None:
        ol = self.query_one(OptionList)
        ol.clear_options()
        hits = [r for r in self.relations if text.lower() in r["name"].lower()]
        # exact names first, then the shortest: typing "orders" picks orders, not orders_pkey
        hits.sort(key=lambda r: (r["name"].lower() != text.lower(), len(r["name"]), r["name"]))
        if not self.relations:
            ol.add_option(Option("(no relation names: no running compute on this branch or its ancestors)",
                                 disabled=True))
        ol.add_options([Option(f"{r['name']}  [dim]{r['relkind']} {r['rel']}[/dim]", id=str(i))
                        for i, r in ((self.relations.index(r), r) for r in hits[:200])])
        if hits:
            ol.highlighted = 0

    @on(Input.Changed)
    def filter(self, event: Input.Changed) -> None:
        self.fill(event.value)

    @on(Input.Submitted)
    def submit(self) -> None:
        ol = self.query_one(OptionList)
        if ol.highlighted is not None and ol.option_count:
            opt = ol.get_option_at_index(ol.highlighted)
            if opt.id is not None:
                self.dismiss(self.relations[int(opt.id)])

    @on(OptionList.OptionSelected)
    def pick(self, event: OptionList.OptionSelected) -> None:
        if event.option.id is not None:
            self.dismiss(self.relations[int(event.option.id)])
