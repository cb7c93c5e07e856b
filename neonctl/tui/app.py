"""`neonctl tui`: the layer-map explorer.

The app owns the data: a poller (an exclusive thread worker that re-arms itself with a timer
after each round, so slow refreshes never stack) takes a `StorageSnapshot` of the project's stored
metadata and builds its DuckDB views, then posts them; every screen reads `app.snapshot` /
`app.db` and is told when they change. Screens are modes: the map (default), the SQL console and
the charts. `create_app` is the factory `run` and the tests share; `replay_app` shows a recorded
snapshot without a project (the snapshot tests).
"""

from __future__ import annotations

from collections.abc import Callable

from textual import on, work
from textual.app import App
from textual.binding import Binding

from neonctl.engine.explorer.metadata import MetadataLoader, StorageSnapshot
from neonctl.engine.explorer.views import MetadataDB
from neonctl.tui.messages import SnapshotReady
from neonctl.tui.screens.charts import ChartsScreen
from neonctl.tui.screens.console import ConsoleScreen
from neonctl.tui.screens.help import HelpScreen
from neonctl.tui.screens.map import MapScreen


class ExplorerApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "neonctl"
    MODES = {"map": MapScreen, "console": ConsoleScreen, "charts": ChartsScreen}
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Keys"),
        Binding("f2", "switch_mode('map')", "Map", priority=True),
        Binding("f3", "switch_mode('console')", "SQL", priority=True),
        Binding("f4", "switch_mode('charts')", "Charts", priority=True),
        Binding("c", "switch_mode('console')", "SQL", show=False),
        Binding("g", "switch_mode('charts')", "Charts", show=False),
        Binding("r", "refresh_now", "Refresh"),
    ]

    def __init__(self, loader: Callable[[], StorageSnapshot], project_name: str, branch: str | None = None,
                 interval: float | None = 2.0) -> None:
        super().__init__()
        self.loader = loader
        self.project_name = project_name
        self.branch = branch
        self.interval = interval
        self.snapshot: StorageSnapshot | None = None
        self.db: MetadataDB | None = None
        self.error: str | None = None
        self.refreshes = 0
        self.data_screens: list = []  # screens that show the data register here when mounted

    def on_mount(self) -> None:
        self.sub_title = f"{self.project_name} · {self.branch or '…'}"
        self.switch_mode("map")
        self.poll()

    # -- refresh ---------------------------------------------------------------------------------

    def action_refresh_now(self) -> None:
        self.poll()

    @work(thread=True, exclusive=True, group="poll")
    def poll(self) -> None:
        try:
            snap = self.loader()
            self.post_message(SnapshotReady(snap, MetadataDB(snap)))
        except Exception as e:  # noqa: BLE001 - shown in the message panel; polling goes on
            self.post_message(SnapshotReady(None, None, f"{e.__class__.__name__}: {e}"))

    @on(SnapshotReady)
    def apply_snapshot(self, msg: SnapshotReady) -> None:
        self.error = msg.error
        if msg.snapshot is not None:
            self.snapshot, self.db = msg.snapshot, msg.db
            names = [t["branch"] for t in msg.snapshot.timelines]
            if self.branch not in names:
                self.branch = msg.snapshot.default_branch if msg.snapshot.default_branch in names else (
                    names[0] if names else msg.snapshot.default_branch)
                self.sub_title = f"{self.project_name} · {self.branch}"
        self.refreshes += 1
        for screen in self.data_screens:
            if isinstance(screen, MapScreen) or screen is self.screen:
                screen.data_changed()
        if self.interval:
            self.set_timer(self.interval, self.poll)

    # -- help ------------------------------------------------------------------------------------

    def action_help(self) -> None:
        seen, rows = set(), []
        for b in self.screen.active_bindings.values():
            key = b.binding.key_display or self.get_key_display(b.binding)
            if (key, b.binding.description) not in seen and b.binding.description:
                seen.add((key, b.binding.description))
                rows.append((key, b.binding.description))
        self.push_screen(HelpScreen(rows))


def create_app(project, branch: str | None = None, interval: float | None = 2.0) -> ExplorerApp:
    loader = MetadataLoader(project)
    return ExplorerApp(loader.load, project.name, branch or project.config.default_branch, interval)


def replay_app(snapshot: StorageSnapshot, branch: str | None = None) -> ExplorerApp:
    """The explorer over a fixed snapshot (recorded or generated): no refresh, no project needed."""
    return ExplorerApp(lambda: snapshot, snapshot.project, branch or snapshot.default_branch, interval=None)


def run(project, branch: str | None = None) -> None:
    create_app(project, branch).run()
