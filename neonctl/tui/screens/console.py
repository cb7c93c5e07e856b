"""The SQL console (harlequin-like): an editor over the same DuckDB views, a results table, history.

ctrl+r (or f5) runs the editor's SQL in a worker against the current snapshot's views; the result
or the error's one line arrives as a message. Picking a history entry loads it into the editor.
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, OptionList, TextArea

from neonctl.engine.explorer.views import MetadataDB, timed_query
from neonctl.errors import NeonctlError
from neonctl.tui.messages import QueryDone

EXAMPLE = ("SELECT kind, level, count(*) AS layers, sum(file_size) AS bytes\n"
           "FROM branch_layers WHERE branch = 'main' GROUP BY ALL ORDER BY ALL")
MAX_ROWS = 1000


class ConsoleScreen(Screen):
    BINDINGS = [
        Binding("ctrl+r,f5", "run", "Run query", priority=True),
        Binding("ctrl+h", "focus_history", "History"),
        Binding("escape", "app.switch_mode('map')", "Map"),
    ]

    def __init__(self) -> None:
        super().__init__(id="console-screen")
        self.history: list[str] = []

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="console-main"):
                yield TextArea(EXAMPLE, language=None, id="editor", soft_wrap=True)
                yield Label("ctrl+r runs · views: layers branch_layers timelines relations commits wal gc daemons "
                            "read_amplification", id="console-status")
                yield DataTable(id="results", zebra_stripes=True)
            yield OptionList(id="history")
        yield Footer()

    def on_mount(self) -> None:
        self.app.data_screens.append(self)
        self.query_one("#history", OptionList).border_title = "history"
        self.query_one("#editor", TextArea).focus()

    def data_changed(self) -> None:
        """Queries run against the newest views when they are submitted: nothing to redraw."""

    def action_run(self) -> None:
        sql = self.query_one("#editor", TextArea).text.strip()
        if sql and self.app.db is not None:
            self.query_one("#console-status", Label).update("running…")
            self.run_query(self.app.db, sql)

    @work(thread=True, exclusive=True, group="console")
    def run_query(self, db: MetadataDB, sql: str) -> None:
        try:
            cols, rows, ms = timed_query(db, sql)
            self.post_message(QueryDone(sql, cols, rows[:MAX_ROWS], ms, None, total=len(rows)))
        except NeonctlError as e:
            self.post_message(QueryDone(sql, [], [], 0.0, str(e)))

    @on(QueryDone)
    def show_result(self, msg: QueryDone) -> None:
        status = self.query_one("#console-status", Label)
        if msg.sql not in self.history:
            self.history.append(msg.sql)
            self.query_one("#history", OptionList).add_option(" ".join(msg.sql.split())[:200])
        if msg.error:
            status.update(f"[red]{msg.error}[/red]")
            status.add_class("-error")
            return
        status.remove_class("-error")
        table = self.query_one("#results", DataTable)
        table.clear(columns=True)
        table.add_columns(*msg.columns)
        table.add_rows([["" if v is None else str(v) for v in r] for r in msg.rows])
        shown = f" (first {MAX_ROWS})" if msg.total > MAX_ROWS else ""
        status.update(f"{msg.total} rows{shown} in {msg.ms:.1f} ms")

    @on(OptionList.OptionSelected, "#history")
    def recall(self, event: OptionList.OptionSelected) -> None:
        editor = self.query_one("#editor", TextArea)
        editor.text = self.history[event.option_index]
        editor.focus()

    def action_focus_history(self) -> None:
        self.query_one("#history", OptionList).focus()
