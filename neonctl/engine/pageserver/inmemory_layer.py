"""The open layer: WAL ingested since the last freeze, indexed in memory by (key, LSN).

It is not durable on its own - the raw WAL it came from is on disk - so after
a crash it is rebuilt by re-ingesting WAL from the disk-consistent LSN.
Freezing writes it out as one L0 delta layer, sorted by (key, LSN).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from neonctl.engine.pageserver.delta_layer import DeltaLayerInfo, DeltaLayerWriter
from neonctl.engine.pageserver.key import Key


class InMemoryLayer:
    def __init__(self, start_lsn: int):
        self.start_lsn = start_lsn
        self.end_lsn = start_lsn
        self.opened_at = time.monotonic()
        self.values: dict[Key, list[tuple[int, bool, bytes]]] = {}
        self.size = 0
        self.count = 0

    def put(self, key: Key, lsn: int, value: bytes, will_init: bool) -> None:
        versions = self.values.setdefault(key, [])
        if versions and versions[-1][0] == lsn:
            versions[-1] = (lsn, will_init or versions[-1][1], value)  # same record twice on one page
        else:
            versions.append((lsn, will_init, value))
            self.count += 1
        self.size += len(value) + 40

    def advance(self, lsn: int) -> None:
        self.end_lsn = max(self.end_lsn, lsn)

    def is_empty(self) -> bool:
        return not self.values

    def get_values(self, key: Key, lsn_end: int) -> list[tuple[int, bool, bytes]]:
        """Versions below lsn_end, newest first, stopping at the first that initialises the page."""
        out = []
        for lsn, will_init, v in reversed(self.values.get(key, ())):
            if lsn >= lsn_end:
                continue
            out.append((lsn, will_init, v))
            if will_init:
                break
        return out

    def write_l0(self, directory: Path, timeline_id: str) -> DeltaLayerInfo:
        """Freeze into an L0 delta covering [start_lsn, end_lsn) and the keys present."""
        keys = sorted(self.values)
        tmp = directory / f"pending-{uuid.uuid4().hex}"
        with DeltaLayerWriter(tmp, timeline_id, keys[0], self.start_lsn) as w:
            for key in keys:
                for lsn, will_init, v in self.values[key]:
                    w.put(key, lsn, v, will_init)
            info = w.finish(keys[-1].next(), self.end_lsn)
        final = directory / str(info.name)
        tmp.rename(final)
        return DeltaLayerInfo(final, info.name, info.timeline_id, info.file_size, info.num_values)
