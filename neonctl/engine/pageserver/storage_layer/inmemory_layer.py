"""The open layer: WAL ingested since the last freeze, kept as column chunks in arrival (LSN) order.

It is not durable on its own - the raw WAL it came from is on disk - so after
a crash it is rebuilt by re-ingesting WAL from the disk-consistent LSN.
Freezing sorts it by (key, LSN) in one go and writes one L0 delta layer.
Point reads scan the chunks with numpy; they are rare (debug page reads) and
the open layer is at most ``checkpoint_distance`` of WAL.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from neonctl.engine.pageserver.key import KEY_SIZE, Key, KeyRange
from neonctl.engine.pageserver.key_columns import dedupe_sorted, key_order
from neonctl.engine.pageserver.storage_layer.delta_layer import (
    DeltaEntries,
    DeltaLayerInfo,
    write_delta_layer,
)
from neonctl.engine.pageserver.storage_layer.layer_name import DeltaLayerName


def concat_entries(chunks: list[DeltaEntries]) -> DeltaEntries:
    """One set of columns from many; their sources stay apart (a tuple) until the layer is written."""
    if len(chunks) == 1:
        return chunks[0]
    parts, offs, base = [], [], 0
    seen: dict[tuple[int, ...], int] = {}
    for c in chunks:
        key = tuple(id(p) for p in c.parts())
        at = seen.get(key)
        if at is None:  # chunks of one WAL batch share its buffers: take them once
            at = seen[key] = base
            parts.extend(c.parts())
            base += sum(len(p) for p in c.parts())
        offs.append(c.off + at)
    return DeltaEntries(np.concatenate([c.ikeys for c in chunks]), np.concatenate([c.will_init for c in chunks]),
                        tuple(parts), np.concatenate(offs), np.concatenate([c.length for c in chunks]),
                        np.concatenate([c.tag for c in chunks]))


def sorted_entries(entries: DeltaEntries) -> DeltaEntries:
    """Entries in (key, LSN) order, one per (key, LSN); input rows of a key must be in LSN order."""
    e = entries.take(key_order(entries.ikeys))
    e.will_init = e.will_init.copy()
    keep = dedupe_sorted(e.ikeys, e.will_init)
    return e if keep.all() else e.take(keep)


class InMemoryLayer:
    def __init__(self, start_lsn: int):
        self.start_lsn = start_lsn
        self.end_lsn = start_lsn
        self.opened_at = time.monotonic()
        self.chunks: list[DeltaEntries] = []
        self.size = 0
        self.count = 0

    def add(self, chunk: DeltaEntries) -> None:
        """Append entries that come after everything already here, LSN-wise."""
        if len(chunk):
            self.chunks.append(chunk)
            self.count += len(chunk)
            self.size += chunk.value_bytes() + 40 * len(chunk)

    def advance(self, lsn: int) -> None:
        self.end_lsn = max(self.end_lsn, lsn)

    def is_empty(self) -> bool:
        return not self.chunks

    def get_values(self, key: Key, lsn_end: int) -> list[tuple[int, bool, bytes]]:
        """Versions below lsn_end, newest first, stopping at the first that initialises the page."""
        kb = np.frombuffer(key.to_bytes(), dtype=np.uint8)
        found: dict[int, tuple[bool, bytes]] = {}
        for c in self.chunks:
            for i in np.flatnonzero((c.ikeys[:, :KEY_SIZE] == kb).all(axis=1)).tolist():
                lsn = int.from_bytes(c.ikeys[i, KEY_SIZE:].tobytes(), "big")
                if lsn < lsn_end:
                    wi = bool(c.will_init[i]) or (lsn in found and found[lsn][0])  # same record twice on a page
                    found[lsn] = (wi, c.value(i))
        out = []
        for lsn in sorted(found, reverse=True):
            wi, v = found[lsn]
            out.append((lsn, wi, v))
            if wi:
                break
        return out

    def keys(self) -> set[Key]:
        """Distinct keys with a version here."""
        out: set[Key] = set()
        for c in self.chunks:
            heads = np.unique(np.ascontiguousarray(c.ikeys[:, :KEY_SIZE]).view(f"V{KEY_SIZE}").ravel())
            out.update(Key.from_bytes(h.tobytes()) for h in heads)
        return out

    def write_l0(self, directory: Path, timeline_id: str) -> DeltaLayerInfo:
        """Freeze into an L0 delta covering [start_lsn, end_lsn) and the keys present."""
        e = sorted_entries(concat_entries(self.chunks))
        first = Key.from_bytes(e.ikeys[0, :KEY_SIZE].tobytes())
        last = Key.from_bytes(e.ikeys[-1, :KEY_SIZE].tobytes())
        name = DeltaLayerName(KeyRange(first, last.next()), self.start_lsn, self.end_lsn)
        return write_delta_layer(directory / str(name), timeline_id, e, first, last.next(), self.start_lsn,
                                 self.end_lsn)
