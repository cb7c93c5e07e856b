"""The map screen: branch tree and daemon panel, the layer map, the selected layer's details.

The layers and markers of the shown branch are queried from the views in a worker (on every
refresh and on a branch switch), the selected layer's details in another; both post messages the
screen applies. Zooming pushes a `Window` on a stack (a relation from the picker, an LSN range, the
selected layer's extent); escape pops it.
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header

from neonctl.engine.explorer import queries
from neonctl.engine.explorer.views import MetadataDB
from neonctl.engine.lsn import format_lsn
from neonctl.tui.map_layout import Marker, Window
from neonctl.tui.messages import BranchChosen, DetailsReady, MapData
from neonctl.tui.screens.lsn_range import LsnRangeScreen
from neonctl.tui.screens.relation_picker import RelationPicker
from neonctl.tui.widgets.branch_tree import BranchTree
from neonctl.tui.widgets.layer_details import LayerDetails
from neonctl.tui.widgets.layer_map import LayerMap
from neonctl.tui.widgets.status_panel import StatusPanel


class MapScreen(Screen):
    BINDINGS = [
        Binding("z", "pick_relation", "Zoom relation"),
        Binding("l", "pick_lsn", "Zoom LSN"),
        Binding("plus,equals_sign", "zoom_layer", "Zoom layer"),
        Binding("escape,minus", "zoom_out", "Back out"),
        Binding("b", "focus_branches", "Branches"),
    ]

    def __init__(self) -> None:
        super().__init__(id="map-screen")
        self.zoom: list[Window] = []

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="side"):
                yield BranchTree(id="branches")
                yield StatusPanel(id="status")
            yield LayerMap(id="layermap")
            yield LayerDetails(id="details")
        yield Footer()

    def on_mount(self) -> None:
        self.app.data_screens.append(self)
        self.query_one(LayerMap).focus()
        self.query_one(LayerDetails).show(None)
        if self.app.snapshot is not None:
            self.data_changed()

    @property
    def window(self) -> Window:
        return self.zoom[-1] if self.zoom else Window()

    # -- data ------------------------------------------------------------------------------------

    def data_changed(self) -> None:
        """A new snapshot: redraw the tree and panel now, query the branch's layers in a worker."""
        app = self.app
        self.query_one(StatusPanel).show(app.snapshot, app.error)
        if app.snapshot is not None:
            self.query_one(BranchTree).set_branches(app.snapshot.timelines, app.branch)
        if app.db is not None:
            self.load_branch(app.db, app.branch)

    @work(thread=True, exclusive=True, group="map-data")
    def load_branch(self, db: MetadataDB, branch: str) -> None:
        self.post_message(MapData(branch, queries.branch_layers(db, branch), queries.lsn_markers(db, branch)))

    @on(MapData)
    def show_map(self, msg: MapData) -> None:
        if msg.branch != self.app.branch:
            return  # the user switched again meanwhile
        m = self.query_one(LayerMap)
        m.border_title = f"layer map of {msg.branch}"
        m.set_data(msg.layers, [Marker(*x) for x in msg.markers], self.window)

    @on(BranchChosen)
    def switch_branch(self, msg: BranchChosen) -> None:
        if msg.branch != self.app.branch:
            self.app.branch = msg.branch
            self.zoom.clear()
            self.app.sub_title = f"{self.app.project_name} · {msg.branch}"
            self.query_one(BranchTree).set_branches(self.app.snapshot.timelines, msg.branch)
            if self.app.db is not None:
                self.load_branch(self.app.db, msg.branch)
        self.query_one(LayerMap).focus()

    @on(LayerMap.Selected)
    def layer_selected(self, msg: LayerMap.Selected) -> None:
        if self.app.db is not None:
            self.load_details(self.app.db, self.app.branch, msg.layer)

    @work(thread=True, exclusive=True, group="details")
    def load_details(self, db: MetadataDB, branch: str, layer: dict) -> None:
        self.post_message(DetailsReady(queries.layer_details(db, branch, layer)))

    @on(DetailsReady)
    def show_details(self, msg: DetailsReady) -> None:
        self.query_one(LayerDetails).show(msg.details)

    # -- zoom ------------------------------------------------------------------------------------

    def zoom_to(self, window: Window) -> None:
        self.zoom.append(window)
        m = self.query_one(LayerMap)
        m.set_data(m.map_layers, m.markers, window)

    def action_zoom_out(self) -> None:
        if self.zoom:
            self.zoom.pop()
            m = self.query_one(LayerMap)
            m.set_data(m.map_layers, m.markers, self.window)

    def action_zoom_layer(self) -> None:
        d = self.query_one(LayerMap).selected_layer
        if d is not None:
            self.zoom_to(Window(d["key_start"], d["key_end"], d["lsn_start"], d["lsn_end"],
                                f"layer at {format_lsn(d['lsn_start'])}"))

    def action_pick_relation(self) -> None:
        db = self.app.db
        if db is None:
            return
        rels = queries.relations_for(db, self.app.branch)

        def chosen(rel: dict | None) -> None:
            if rel is not None:
                self.zoom_to(Window(rel["key_start"], rel["key_end"], self.window.lsn_start, self.window.lsn_end,
                                    rel["name"]))

        self.app.push_screen(RelationPicker(rels), chosen)

    def action_pick_lsn(self) -> None:
        def chosen(rng: tuple[int, int] | None) -> None:
            if rng is not None:
                w = self.window
                self.zoom_to(Window(w.key_start, w.key_end, rng[0], rng[1],
                                    f"{format_lsn(rng[0])}..{format_lsn(rng[1])}"))

        self.app.push_screen(LsnRangeScreen(), chosen)

    def action_focus_branches(self) -> None:
        self.query_one(BranchTree).focus()
