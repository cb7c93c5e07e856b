"""Charts over the views: WAL bytes per minute by branch, layer bytes by kind and level, and read
amplification across the shown branch's key space. The series are queried in a worker; the plots
are drawn when its message arrives."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header
from textual_plotext import PlotextPlot

from neonctl.engine.explorer import queries
from neonctl.engine.explorer.views import MetadataDB


class ChartData(Message):
    def __init__(self, branch: str, wal: dict, kinds: list[dict], amp: list[dict]) -> None:
        super().__init__()
        self.branch, self.wal, self.kinds, self.amp = branch, wal, kinds, amp


class ChartsScreen(Screen):
    BINDINGS = [Binding("escape", "app.switch_mode('map')", "Map")]

    def __init__(self) -> None:
        super().__init__(id="charts-screen")
        self.data: ChartData | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Grid(id="charts"):
            yield PlotextPlot(id="wal-chart")
            yield PlotextPlot(id="kind-chart")
            yield PlotextPlot(id="amp-chart")
        yield Footer()

    def on_mount(self) -> None:
        self.app.data_screens.append(self)

    def on_screen_resume(self) -> None:
        self.data_changed()

    def data_changed(self) -> None:
        if self.app.db is not None:
            self.load(self.app.db, self.app.branch)

    @work(thread=True, exclusive=True, group="charts")
    def load(self, db: MetadataDB, branch: str) -> None:
        self.post_message(ChartData(branch, queries.wal_per_minute(db), queries.bytes_by_kind(db),
                                    queries.read_amplification(db, branch)))

    @on(ChartData)
    def draw(self, msg: ChartData) -> None:
        self.data = msg
        wal = self.query_one("#wal-chart", PlotextPlot)
        p = wal.plt
        p.clear_data()
        p.clear_figure()
        p.title("WAL written per minute (MiB) by branch")
        for branch, pts in sorted(msg.wal.items()):
            if pts:
                p.plot(list(range(len(pts))), [b / 2**20 for _, b in pts], label=branch)
        p.xlabel("minute (from each branch's first commit)")
        wal.refresh()
        kind = self.query_one("#kind-chart", PlotextPlot)
        p = kind.plt
        p.clear_data()
        p.clear_figure()
        p.title("layer bytes by kind and level (MiB)")
        if msg.kinds:
            p.bar([r["class"] for r in msg.kinds], [r["bytes"] / 2**20 for r in msg.kinds])
        kind.refresh()
        amp = self.query_one("#amp-chart", PlotextPlot)
        p = amp.plt
        p.clear_data()
        p.clear_figure()
        p.title(f"read amplification across the key space of {msg.branch}")
        if msg.amp:
            p.plot(list(range(len(msg.amp))), [r["read_amplification"] for r in msg.amp])
            worst = max(msg.amp, key=lambda r: r["read_amplification"])
            p.xlabel(f"key ranges in key order · worst {worst['read_amplification']} at "
                     f"{worst['start_rel'] or worst['key_start']}")
        amp.refresh()
