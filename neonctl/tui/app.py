"""`neonctl tui`: branches, daemons and each branch's layer map, refreshed in the background.

Polling is an exclusive thread worker that re-arms itself after each round, so
slow daemons never stack requests; the UI changes only when a snapshot message
arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual import on, work
from textual.app import App, ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import DataTable, Footer, Header, Static

from neonctl.engine.branches import branch_rows
from neonctl.engine.inspect import layer_rows
from neonctl.engine.project import Project
from neonctl.engine.storage import storage_status
from neonctl.tui.layer_map_render import render


@dataclass(frozen=True)
class Snapshot:
    branches: list
    daemons: list
    layers: list
    error: str | None = None


class SnapshotReady(Message):
    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot


class NeonctlApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "neonctl"
    BINDINGS = [("q", "quit", "Quit"), ("r", "refresh", "Refresh")]

    def __init__(self, project: Project, interval: float = 2.0):
        super().__init__()
        self.project = project
        self.interval = interval
        self.selected = project.config.default_branch
        self.layer_map_text = ""
        self.sub_title = f"project {project.name}"

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="left"):
                yield DataTable(id="branches", cursor_type="row")
                yield DataTable(id="daemons")
            yield Static(id="layermap")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#branches", DataTable).add_columns("branch", "head", "endpoint")
        self.query_one("#daemons", DataTable).add_columns("daemon", "state", "pid")
        self.poll()

    def action_refresh(self) -> None:
        self.poll()

    @work(thread=True, exclusive=True, group="poll")
    def poll(self) -> None:
        try:
            snap = Snapshot(branch_rows(self.project), storage_status(self.project),
                            layer_rows(self.project, self.selected))
        except Exception as e:  # noqa: BLE001 - shown in the UI, polling goes on
            snap = Snapshot([], [], [], error=str(e))
        self.post_message(SnapshotReady(snap))

    @on(SnapshotReady)
    def show(self, msg: SnapshotReady) -> None:
        s = msg.snapshot
        bt = self.query_one("#branches", DataTable)
        bt.clear()
        for b in s.branches:
            bt.add_row(b["tree"], b["head_lsn"] or "", b["endpoint"] or "", key=b["name"])
        dt = self.query_one("#daemons", DataTable)
        dt.clear()
        for d in s.daemons:
            dt.add_row(d["name"], d["state"], str(d["pid"] or ""))
        text = "\n".join(render(s.layers, width=64, height=18))
        if s.error:
            text = f"[red]{s.error}[/red]\n" + text
        self.layer_map_text = f"[b]layer map of {self.selected}[/b]\n{text}"
        self.query_one("#layermap", Static).update(self.layer_map_text)
        self.set_timer(self.interval, self.poll)

    @on(DataTable.RowSelected, "#branches")
    def select_branch(self, event: DataTable.RowSelected) -> None:
        self.selected = str(event.row_key.value)
        self.poll()


def run(project: Project) -> None:
    NeonctlApp(project).run()
