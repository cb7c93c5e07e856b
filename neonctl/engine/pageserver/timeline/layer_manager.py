"""A timeline's layered storage: open in-memory layer -> L0 deltas -> compacted L1 deltas (+ images).

Ingest puts every scanned WAL batch into the open layer; it is frozen into an
L0 delta when it spans `checkpoint_distance` of WAL or has been open for
`checkpoint_timeout`. Once `compaction_threshold` L0s pile up they are
merge-sorted by (key, LSN) into L1 deltas of about `compaction_target_size`,
each covering a narrow key range, so a page lookup touches few files. Both
steps work on whole columns (every index entry and value region read at
once, sorted, written in bulk). The compaction runs inline with ingest:
ingest waits for it, which is the backpressure. Reads walk layers newest-first and stop at the first page
image or will_init record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from neonctl.engine.failpoints import failpoint
from neonctl.engine.pageserver import value
from neonctl.engine.pageserver.config import PageserverConfig
from neonctl.engine.pageserver.images.image_set import ImageInfo
from neonctl.engine.pageserver.key import KEY_SIZE, Key, KeyRange
from neonctl.engine.pageserver.storage_layer.delta_layer import (
    DeltaLayerReader,
    joined_sources,
    write_delta_layer,
)
from neonctl.engine.pageserver.storage_layer.image_layer import ImageLayerReader
from neonctl.engine.pageserver.storage_layer.inmemory_layer import (
    InMemoryLayer,
    concat_entries,
    sorted_entries,
)
from neonctl.engine.pageserver.storage_layer.layer_name import DeltaLayerName
from neonctl.engine.pageserver.timeline.layer_map import LayerDesc, LayerMap
from neonctl.engine.pageserver.timeline.wal_ingest import WalIngest
from neonctl.engine.wal.record_scan import RecordBatch

log = logging.getLogger("pageserver.layers")


def _heads_in_range(ikeys: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The keys (as V18 scalars) of index rows (key || LSN big-endian) whose LSN is in [lo, hi]."""
    if len(ikeys) == 0:
        return np.empty(0, dtype=f"V{KEY_SIZE}")
    lsns = np.ascontiguousarray(ikeys[:, KEY_SIZE:]).view(">u8").ravel()
    rows = ikeys[(lsns >= lo) & (lsns <= hi), :KEY_SIZE]
    return np.ascontiguousarray(rows).view(f"V{KEY_SIZE}").ravel()


def first_per_key(rows: list[np.ndarray], inits: list[np.ndarray], lo: int, hi: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of index rows (key || LSN big-endian, with will_init), the earliest per key with lo <= LSN < hi."""
    if not rows:
        return np.empty(0, dtype=f"S{KEY_SIZE}"), np.empty(0, dtype=np.uint64), np.empty(0, dtype=bool)
    r, w = np.concatenate(rows), np.concatenate(inits)
    lsns = np.ascontiguousarray(r[:, KEY_SIZE:]).view(">u8").ravel().astype(np.uint64)
    keep = (lsns >= lo) & (lsns < hi)
    r, w, lsns = r[keep], w[keep], lsns[keep]
    return earliest_per_key(np.ascontiguousarray(r[:, :KEY_SIZE]).view(f"S{KEY_SIZE}").ravel(), lsns, w)


def earliest_per_key(keys: np.ndarray, lsns: np.ndarray, flags: np.ndarray) -> tuple[np.ndarray, ...]:
    """(keys, lsns, flags) reduced to each key's row with the lowest LSN, sorted by key."""
    order = np.lexsort((lsns, keys))  # by key, then LSN
    keys, lsns, flags = keys[order], lsns[order], flags[order]
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    return keys[first], lsns[first], flags[first]


class LayerStore:
    def __init__(self, directory: Path, timeline_id: str, pg_version: int, start_lsn: int,
                 config: PageserverConfig, on_change: Callable[[str, list[LayerDesc]], None] | None = None):
        self.dir = directory
        self.timeline_id = timeline_id
        self.config = config
        self.map = LayerMap(directory)
        removed = self.map.load()
        if removed:
            log.warning("timeline %s: removed %d layer file(s) not in the index: %s", timeline_id, len(removed),
                        ", ".join(removed[:3]))
        if not self.map.disk_consistent_lsn:
            self.map.disk_consistent_lsn = start_lsn
        self.ingest = WalIngest(pg_version)
        self.open = InMemoryLayer(self.map.disk_consistent_lsn)
        self.on_change = on_change
        self.lock = threading.RLock()
        self._readers: dict[str, DeltaLayerReader | ImageLayerReader] = {}

    @property
    def disk_consistent_lsn(self) -> int:
        return self.map.disk_consistent_lsn

    # -- write path -----------------------------------------------------------

    def put_batch(self, batch: RecordBatch) -> None:
        """Add a scanned batch, freezing an L0 whenever the open layer reaches checkpoint_distance of WAL."""
        with self.lock:
            # records already in a frozen layer (re-ingest after restart) are skipped
            first = int(np.searchsorted(batch.end, self.open.start_lsn, side="right"))
            while first < len(batch):
                # up to and including the record that takes the open layer to checkpoint_distance
                cut = self.open.start_lsn + self.config.checkpoint_distance
                last = min(max(int(np.searchsorted(batch.end, cut, side="left")) + 1, first + 1), len(batch))
                for chunk in self.ingest.batch_entries(batch, first, last):
                    self.open.add(chunk)
                self.open.advance(int(batch.end[last - 1]))
                first = last
                if first < len(batch):
                    self.maybe_freeze()

    def maybe_freeze(self, force: bool = False) -> bool:
        with self.lock:
            o = self.open
            if o.is_empty():
                return False
            due = (o.end_lsn - o.start_lsn >= self.config.checkpoint_distance
                   or o.size >= self.config.checkpoint_distance
                   or time.monotonic() - o.opened_at >= self.config.checkpoint_timeout)
            if not (due or force):
                return False
            self.freeze()
            return True

    def freeze(self) -> None:
        with self.lock:
            o = self.open
            info = o.write_l0(self.dir, self.timeline_id)
            failpoint("layer-written-before-index")
            desc = LayerDesc.from_name(str(info.name), 0, info.file_size, info.num_values)
            self.map.replace([desc], [], disk_consistent_lsn=o.end_lsn)
            failpoint("index-written")
            self.open = InMemoryLayer(o.end_lsn)
            log.info("timeline %s: froze L0 %s (%d values, %d bytes)", self.timeline_id, desc.name,
                     desc.num_values, desc.file_size)
            self._changed()
            if len(self.map.l0()) >= self.config.compaction_threshold:
                self.compact()

    def compact(self) -> None:
        """Merge every L0 into key-partitioned L1 deltas over the same LSN range."""
        with self.lock:
            l0 = self.map.l0()
            if len(l0) < 2:
                return
            lsn_start, lsn_end = l0[0].lsn_start, max(d.lsn_end for d in l0)
            # L0s in LSN order, each sorted: a stable sort by key leaves each key's versions in LSN order
            merged = concat_entries([self.reader(d.name).read_all() for d in l0])
            merged.src = joined_sources(merged.parts(), "compaction")  # one buffer for all the L1 writes
            merged = sorted_entries(merged)
            new: list[LayerDesc] = []
            for lo, hi in _partitions(merged.ikeys, merged.length + 40, self.config.compaction_target_size):
                part = merged.take(slice(lo, hi))
                first = Key.from_bytes(part.ikeys[0, :KEY_SIZE].tobytes())
                end = (Key.from_bytes(merged.ikeys[hi, :KEY_SIZE].tobytes()) if hi < len(merged)
                       else Key.from_bytes(part.ikeys[-1, :KEY_SIZE].tobytes()).next())
                path = self.dir / str(DeltaLayerName(KeyRange(first, end), lsn_start, lsn_end))
                info = write_delta_layer(path, self.timeline_id, part, first, end, lsn_start, lsn_end)
                new.append(LayerDesc.from_name(str(info.name), 1, info.file_size, info.num_values))
            failpoint("compaction-written-before-index")
            for d in l0:
                r = self._readers.pop(d.name, None)
                if r is not None:
                    r.close()
            self.map.replace(new, [d.name for d in l0])
            log.info("timeline %s: compacted %d L0 into %d L1 layer(s)", self.timeline_id, len(l0), len(new))
            self._changed()

    def keys_written(self, lo: int, hi: int) -> set[Key]:
        """Every key with a value in [lo, hi] (a value's LSN is its record's start; both ends are included,
        so this may hold a key more than the exact range, never one less - safe for its one use, the pages a
        rebuild rewrites, `images/rebuild.py`). A delta layer inside the range gives all its keys; one that
        straddles an end, and the open layer, only those of their entries in range: a kept directory that
        stopped in the middle of a layer is not charged the pages written after it stopped."""
        out: set[Key] = set()
        if hi <= lo:
            return out  # an empty range (an image right at the branch point)
        heads: list[np.ndarray] = []
        with self.lock:
            for d in list(self.map.layers.values()):
                if d.kind != "delta" or d.lsn_start > hi or d.lsn_end <= lo:
                    continue
                reader = self.reader(d.name)
                if lo <= d.lsn_start and d.lsn_end <= hi:
                    out.update(reader.keys())  # noqa: SIM118 - a layer reader
                else:
                    heads.append(_heads_in_range(reader.index_keys(), lo, hi))
            if self.open.start_lsn <= hi:
                heads.extend(_heads_in_range(c.ikeys, lo, hi) for c in self.open.chunks)
        if heads:
            distinct = np.unique(np.concatenate(heads))
            out.update(Key.from_bytes(h.tobytes()) for h in distinct)
        return out

    def first_writes(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per key, its first value with lo <= LSN < hi (a value's LSN is its record's start): (keys as sorted S18,
        their LSNs, whether that value initialises the page), from the layers' indexes alone. Exact, unlike
        keys_written: `images/replay_inits.py` relies on "first"."""
        rows: list[np.ndarray] = []
        inits: list[np.ndarray] = []
        with self.lock:
            for d in list(self.map.layers.values()):
                if d.kind == "delta" and d.lsn_start < hi and d.lsn_end > lo:
                    r, w = self.reader(d.name).index_rows()
                    rows.append(r)
                    inits.append(w)
            if self.open.start_lsn < hi:
                for c in self.open.chunks:
                    rows.append(c.ikeys)
                    inits.append(np.asarray(c.will_init, dtype=bool))
        return first_per_key(rows, inits, lo, hi)

    def add_images(self, info) -> None:
        """Register an image (its layer files are already on disk) in the index, atomically."""
        with self.lock:
            self.map.extra.setdefault("images", []).append(info.to_dict())
            self.map.replace(image_descs(info), [])
            self._changed()

    def forget(self, names: list[str]) -> None:
        """Drop layers from the index (durably) and then delete their files; also saves `extra`."""
        with self.lock:
            for n in names:
                r = self._readers.pop(n, None)
                if r is not None:
                    r.close()
            self.map.replace([], names)
            self._changed()

    def _changed(self) -> None:
        if self.on_change:
            self.on_change(self.timeline_id, list(self.map.layers.values()))

    # -- read path ------------------------------------------------------------

    def reader(self, name: str) -> DeltaLayerReader | ImageLayerReader:
        r = self._readers.get(name)
        if r is None:
            d = self.map.layers[name]
            r = (DeltaLayerReader if d.kind == "delta" else ImageLayerReader)(self.map.path(name))
            self._readers[name] = r
        return r

    def get_values(self, key: Key, lsn_end: int) -> tuple[list[tuple[int, bool, bytes]], bool]:
        """Versions of key below lsn_end newest-first, and whether the oldest one initialises the page.

        An image at LSN I holds the page as of I (every record starting below
        I applied); only delta values at or above I matter on top of it.
        """
        with self.lock:
            layers = self.map.search(key, lsn_end)
            image = next((d for d in layers if d.kind == "image"), None)
            floor = image.lsn_start if image else 0
            out: list[tuple[int, bool, bytes]] = []
            cur_end = lsn_end
            if lsn_end > self.open.start_lsn:
                for v in self.open.get_values(key, lsn_end):
                    if v[0] < floor:
                        break
                    out.append(v)
                    if v[1]:
                        return out, True
                cur_end = min(lsn_end, self.open.start_lsn)
            for d in layers:
                if d.kind != "delta" or d.lsn_end <= floor or d.lsn_start >= cur_end:
                    continue
                for v in self.reader(d.name).get_values(key, cur_end):
                    if v[0] < floor:
                        break
                    out.append(v)
                    if v[1]:
                        return out, True
                cur_end = min(cur_end, d.lsn_start)
            if image is not None:
                page = self.reader(image.name).get(key)
                if page is not None:  # image layers store bare pages; versions are tagged values
                    out.append((image.lsn_start, True, value.image(page)))
                    return out, True
                return out, bool(out) and out[-1][1]  # absent at the image: did not exist then
            return out, False

    def changed_pages(self) -> dict[tuple[int, int, int, int], int]:
        """Distinct relation blocks with any version in this timeline's own layers, per relation fork.

        A branch's layers hold only WAL written on the branch, so this is
        "what changed since the branch point" - answered from indexes alone.
        """
        with self.lock:
            keys: set = {k for k in self.open.keys() if k.is_rel_block()}  # noqa: SIM118 - an in-memory layer, not a dict
            for d in self.map.layers.values():
                if d.kind == "delta":
                    keys.update(k for k in self.reader(d.name).keys() if k.is_rel_block())  # noqa: SIM118
        out: dict[tuple[int, int, int, int], int] = {}
        for k in keys:
            tag = k.rel_tag()
            out[tag] = out.get(tag, 0) + 1
        return out

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


def _partitions(ikeys: np.ndarray, sizes: np.ndarray, target: int) -> list[tuple[int, int]]:
    """Row ranges of about ``target`` bytes each, cut only where the key changes (never inside a key)."""
    n = len(ikeys)
    if n == 0:
        return []
    starts = np.flatnonzero((ikeys[1:, :KEY_SIZE] != ikeys[:-1, :KEY_SIZE]).any(axis=1)) + 1  # new-key rows
    cum = np.concatenate([[0], np.cumsum(sizes)])
    out, lo = [], 0
    while True:
        # first key start whose preceding rows (since lo) reach the target
        j = int(np.searchsorted(cum[starts], cum[lo] + target, side="left"))
        while j < len(starts) and starts[j] <= lo:
            j += 1
        if j >= len(starts):
            out.append((lo, n))
            return out
        out.append((lo, int(starts[j])))
        lo = int(starts[j])


def image_descs(info: ImageInfo) -> list[LayerDesc]:
    """The index entries of an image's layer files."""
    return [LayerDesc.from_name(f.name, -1, f.file_size, f.num_values) for f in info.layers]
