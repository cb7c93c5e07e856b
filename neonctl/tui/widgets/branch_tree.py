"""The branch tree: parents above children; choosing a branch switches the layer map."""

from __future__ import annotations

from textual import on
from textual.widgets import Tree

from neonctl.engine.lsn import format_lsn
from neonctl.tui.messages import BranchChosen


class BranchTree(Tree[str]):
    def __init__(self, **kw) -> None:
        super().__init__("branches", **kw)
        self.show_root = False
        self._shape: list[tuple] = []

    def set_branches(self, timelines: list[dict], current: str) -> None:
        shape = [(t["branch"], t["parent"], t["head"], t["branch"] == current) for t in timelines]
        if shape == self._shape:
            return
        self._shape = shape
        self.clear()
        nodes = {}
        for t in timelines:  # parents come first (metadata lists branches by creation)
            parent = nodes.get(t["parent"], self.root)
            mark = "● " if t["branch"] == current else ""
            label = f"{mark}{t['branch']}  {format_lsn(t['head'])}"
            nodes[t["branch"]] = parent.add(label, data=t["branch"], expand=True, allow_expand=False)
        self.root.expand_all()
        if current in nodes:
            self.move_cursor(nodes[current])

    @on(Tree.NodeSelected)
    def choose(self, event: Tree.NodeSelected) -> None:
        event.stop()
        if event.node.data:
            self.post_message(BranchChosen(event.node.data))
