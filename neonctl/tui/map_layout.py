"""Laying out a branch's layer map in a grid of terminal cells: key space across, LSN upwards.

Pure functions of the layer rows (no Textual), so they are unit-tested and benchmarked alone.

- Columns are *ranks* of the distinct layer boundaries inside the window (real key distances span
  2^144 and would squash every relation into one column); rows scale LSNs linearly, newest on top.
- Layers are painted largest first, images last, so small layers stay visible on top of the big
  ones they overlap; ``Layout.grid`` holds, per cell, the index of the layer drawn there (-1 empty):
  the widget colours cells from it and maps a mouse click back to a layer.
- ``neighbor`` moves a cursor from layer to layer in key x LSN order; ``Window`` is a zoomed part
  of the space (a relation's key range, an LSN range).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MIN_KEY = "0" * 36
MAX_KEY = "F" * 36


@dataclass(frozen=True)
class Window:
    """The part of key x LSN space shown: keys [key_start, key_end), LSNs [lsn_start, lsn_end)."""

    key_start: str = MIN_KEY
    key_end: str = MAX_KEY
    lsn_start: int | None = None
    lsn_end: int | None = None
    label: str = "whole key space"

    def admits(self, d: dict) -> bool:
        if not (d["key_start"] < self.key_end and self.key_start < d["key_end"]):
            return False
        if self.lsn_start is not None and d["lsn_end"] <= self.lsn_start:
            return False
        return not (self.lsn_end is not None and d["lsn_start"] >= self.lsn_end)


@dataclass(frozen=True)
class Marker:
    """A point on the LSN axis: branch points, the PITR window's start, the GC cutoff, the head."""

    lsn: int
    label: str
    kind: str  # "branch_point" | "child" | "pitr" | "gc" | "gc_next" | "head"


@dataclass
class Layout:
    layers: list[dict]  # the visible layers; grid values index into it
    grid: np.ndarray  # (height, width) int32
    c0: np.ndarray
    c1: np.ndarray
    r0: np.ndarray  # top row (newest LSN) of each layer
    r1: np.ndarray  # bottom row, exclusive
    lsn_lo: int
    lsn_hi: int
    boundaries: int
    markers: dict[int, list[Marker]] = field(default_factory=dict)  # row -> markers there

    @property
    def height(self) -> int:
        return self.grid.shape[0]

    @property
    def width(self) -> int:
        return self.grid.shape[1]

    def at(self, x: int, y: int) -> int | None:
        if 0 <= y < self.height and 0 <= x < self.width:
            i = int(self.grid[y, x])
            return i if i >= 0 else None
        return None

    def row_of(self, lsn: int) -> int:
        """Top-based row of an LSN (clamped)."""
        span = max(1, self.lsn_hi - self.lsn_lo)
        r = (min(max(lsn, self.lsn_lo), self.lsn_hi) - self.lsn_lo) * self.height // span
        return self.height - 1 - min(self.height - 1, r)


def layout(layers: list[dict], width: int, height: int, window: Window = Window(),
           markers: list[Marker] = ()) -> Layout:
    vis = [d for d in layers if window.admits(d)]
    width, height = max(1, width), max(1, height)
    n = len(vis)
    grid = np.full((height, width), -1, dtype=np.int32)
    if not n:
        return Layout(vis, grid, *(np.zeros(0, dtype=np.int64),) * 4, 0, 0, 0)
    ks = np.array([max(d["key_start"], window.key_start) for d in vis])
    ke = np.array([min(d["key_end"], window.key_end) for d in vis])
    bounds = np.unique(np.concatenate([ks, ke]))
    last = max(1, len(bounds) - 1)
    col_ks = np.searchsorted(bounds, ks) * (width - 1) // last if len(bounds) > 1 else np.zeros(n, dtype=np.int64)
    col_ke = np.searchsorted(bounds, ke) * (width - 1) // last if len(bounds) > 1 else np.full(n, width, np.int64)
    c0 = col_ks.astype(np.int64)
    c1 = np.maximum(c0 + 1, col_ke).astype(np.int64)
    c1[np.searchsorted(bounds, ke) == len(bounds) - 1] = width  # the last boundary is the right edge
    ls = np.array([d["lsn_start"] for d in vis], dtype=np.float64)
    le = np.array([d["lsn_end"] for d in vis], dtype=np.float64)
    lo = window.lsn_start if window.lsn_start is not None else int(ls.min())
    hi = window.lsn_end if window.lsn_end is not None else int(le.max())
    for m in markers:  # keep every marker of an unzoomed map on screen
        if window.lsn_start is None and window.lsn_end is None:
            lo, hi = min(lo, m.lsn), max(hi, m.lsn)
    span = max(1, hi - lo)
    # rows counted from the bottom: [b0, b1) ; an image (1 LSN) gets one row
    b0 = np.clip(((ls - lo) * height // span), 0, height - 1).astype(np.int64)
    b1 = np.clip(((le - 1 - lo) * height // span), 0, height - 1).astype(np.int64) + 1
    b1 = np.maximum(b1, b0 + 1)
    r0, r1 = height - b1, height - b0
    kinds = [d["kind"] == "image" for d in vis]
    area = (c1 - c0) * (r1 - r0)
    order = sorted(range(n), key=lambda i: (kinds[i], -int(area[i]), vis[i]["lsn_start"], vis[i]["key_start"]))
    for i in order:
        grid[r0[i]:r1[i], c0[i]:c1[i]] = i
    out = Layout(vis, grid, c0, c1, r0, r1, int(lo), int(hi), len(bounds))
    for m in markers:
        if lo <= m.lsn <= hi:
            out.markers.setdefault(out.row_of(m.lsn), []).append(m)
    return out


def default_selection(lay: Layout) -> int | None:
    """The newest layer at the left edge: where a cursor starts."""
    if not lay.layers:
        return None
    return min(range(len(lay.layers)), key=lambda i: (lay.layers[i]["key_start"], -lay.layers[i]["lsn_end"]))


def neighbor(lay: Layout, current: int | None, direction: str) -> int | None:
    """The layer a cursor moves to from `current` ("left", "right", "up", "down"), or `current`.

    left/right: the nearest layer starting at another key boundary, closest in LSN; up/down: the
    nearest newer/older layer overlapping the current key range (else any newer/older one).
    """
    if current is None:
        return default_selection(lay)
    cur = lay.layers[current]
    mid = (cur["lsn_start"] + cur["lsn_end"]) / 2
    best, best_score = current, None
    for i, d in enumerate(lay.layers):
        if i == current:
            continue
        dmid = (d["lsn_start"] + d["lsn_end"]) / 2
        overlap = d["key_start"] < cur["key_end"] and cur["key_start"] < d["key_end"]
        if direction == "right" and (d["key_start"], dmid) > (cur["key_start"], mid) and d["key_start"] != cur[
                "key_start"]:
            score = (d["key_start"], abs(dmid - mid), d["name"])
        elif direction == "left" and d["key_start"] < cur["key_start"]:
            score = (_neg(d["key_start"]), abs(dmid - mid), d["name"])
        elif direction == "up" and (dmid, d["name"]) > (mid, cur["name"]):
            score = (not overlap, dmid - mid, d["key_start"])
        elif direction == "down" and (dmid, d["name"]) < (mid, cur["name"]):
            score = (not overlap, mid - dmid, d["key_start"])
        else:
            continue
        if best_score is None or score < best_score:
            best, best_score = i, score
    return best


def _neg(hex_key: str) -> str:
    """A string that sorts in the reverse order of hex keys (for 'nearest to the left')."""
    return "".join("0123456789ABCDEF"[15 - int(c, 16)] for c in hex_key)
