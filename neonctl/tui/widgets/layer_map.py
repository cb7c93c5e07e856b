"""The layer map widget: a branch's layers in key x LSN space, with a cursor that moves between them.

The grid comes from `map_layout.layout` (recomputed when the data, the window or the size change);
each line is drawn from the grid as runs of one layer. Arrow keys and clicks move the cursor and
post `LayerMap.Selected`. Colours are component classes styled in `app.tcss`: own layers by
kind/level (alternating two shades so neighbours stay apart), inherited ones dimmed, markers on
the LSN axis in the right-hand gutter.
"""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.strip import Strip
from textual.widget import Widget

from neonctl.engine.lsn import format_lsn
from neonctl.tui.map_layout import (
    Layout,
    Marker,
    Window,
    default_selection,
    layout,
    neighbor,
)

GUTTER = 22
GLYPH = {0: "░", 1: "▒"}
IMAGE = "━"
MARK = "┄"


class LayerMap(Widget, can_focus=True):
    BINDINGS = [
        Binding("left", "move('left')", "←", show=False),
        Binding("right", "move('right')", "→", show=False),
        Binding("up", "move('up')", "newer", show=False),
        Binding("down", "move('down')", "older", show=False),
    ]
    COMPONENT_CLASSES = {"layer-map--l0", "layer-map--l1", "layer-map--l1-alt", "layer-map--image",
                         "layer-map--inherited", "layer-map--selected", "layer-map--marker",
                         "layer-map--gc", "layer-map--pitr", "layer-map--axis"}

    selected: reactive[int | None] = reactive(None, layout=False)

    class Selected(Message):
        def __init__(self, layer: dict) -> None:
            super().__init__()
            self.layer = layer

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.map_layers: list[dict] = []
        self.markers: list[Marker] = []
        self.map_window = Window()
        self.lay: Layout | None = None
        self._styles: dict[str, Style] = {}

    # -- data ------------------------------------------------------------------------------------

    def set_data(self, layers: list[dict], markers: list[Marker], window: Window | None = None) -> None:
        """New layers (a refresh, a branch switch, a zoom); the cursor stays on the same file if it can."""
        keep = self.selected_layer["name"] if self.selected_layer else None
        self.map_layers, self.markers = layers, markers
        if window is not None:
            self.map_window = window
        self.border_subtitle = "" if self.map_window == Window() else f"zoom: {self.map_window.label} · esc backs out"
        self.relayout()
        names = [d["name"] for d in self.lay.layers]
        self.set_selected(names.index(keep) if keep in names else default_selection(self.lay))

    def relayout(self) -> Layout:
        w, h = self.size.width or 80, self.size.height or 24
        self.lay = layout(self.map_layers, max(1, w - GUTTER), max(1, h - 1), self.map_window, self.markers)
        self.refresh()
        return self.lay

    @property
    def selected_layer(self) -> dict | None:
        if self.lay is None or self.selected is None or self.selected >= len(self.lay.layers):
            return None
        return self.lay.layers[self.selected]

    def set_selected(self, index: int | None) -> None:
        self.selected = index
        self.refresh()
        if index is not None:  # also when unchanged: new data may change the layer's details
            self.post_message(self.Selected(self.lay.layers[index]))

    def select_name(self, name: str) -> bool:
        for i, d in enumerate(self.lay.layers if self.lay else []):
            if d["name"] == name:
                self.set_selected(i)
                return True
        return False

    # -- input -----------------------------------------------------------------------------------

    def action_move(self, direction: str) -> None:
        if self.lay is not None and self.lay.layers:
            self.set_selected(neighbor(self.lay, self.selected, direction))

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is not None and self.lay is not None:
            hit = self.lay.at(offset.x, offset.y)
            if hit is not None:
                self.set_selected(hit)

    def on_resize(self, event: events.Resize) -> None:
        if self.map_layers:
            self.relayout()

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return container.height

    # -- drawing ---------------------------------------------------------------------------------

    def _style(self, name: str) -> Style:
        return self.get_component_rich_style(name, partial=True)

    def render_line(self, y: int) -> Strip:
        lay = self.lay
        width = self.size.width
        if lay is None or not lay.layers:
            text = "(no layers: WAL is still in the open in-memory layer)" if lay is not None else "loading…"
            return Strip([Segment(text[:width].ljust(width) if y == 0 else " " * width)])
        if y == lay.height:
            return self._axis_line(lay, width)
        if y > lay.height:
            return Strip.blank(width)
        row = lay.grid[y]
        marks = lay.markers.get(y, [])
        mark_style = self._style(_marker_class(marks[0].kind)) if marks else None
        segs: list[Segment] = []
        x = 0
        n = len(row)
        while x < n:
            i = int(row[x])
            end = x + 1
            while end < n and row[end] == i:
                end += 1
            if i < 0:
                segs.append(Segment((MARK if marks else " ") * (end - x), mark_style))
            else:
                segs.append(Segment(self._glyph(lay.layers[i]) * (end - x), self._layer_style(lay.layers[i], i)))
            x = end
        label = ""
        if marks:
            label = f" ◂ {marks[0].label} {format_lsn(marks[0].lsn)}" + (" +" if len(marks) > 1 else "")
        segs.append(Segment(label[:GUTTER].ljust(GUTTER), mark_style))
        return Strip(segs)

    def _axis_line(self, lay: Layout, width: int) -> Strip:
        text = (f"keys → ({lay.boundaries} boundaries)  LSN ↑ {format_lsn(lay.lsn_lo)}..{format_lsn(lay.lsn_hi)}"
                f"  ░ L0 ▒ L1 ━ image")
        return Strip([Segment(text[:width].ljust(width), self._style("layer-map--axis"))])

    @staticmethod
    def _glyph(d: dict) -> str:
        return IMAGE if d["kind"] == "image" else GLYPH.get(d["level"], "▓")

    def _layer_style(self, d: dict, i: int) -> Style:
        if d["kind"] == "image":
            cls = "layer-map--image"
        elif d["level"] == 0:
            cls = "layer-map--l0"
        else:
            cls = "layer-map--l1" if i % 2 else "layer-map--l1-alt"
        style = self._style(cls)
        if d.get("inherited"):
            style += self._style("layer-map--inherited")
        if i == self.selected:
            style += self._style("layer-map--selected")
        return style


def _marker_class(kind: str) -> str:
    return {"gc": "layer-map--gc", "gc_next": "layer-map--gc", "pitr": "layer-map--pitr"}.get(kind, "layer-map--marker")
