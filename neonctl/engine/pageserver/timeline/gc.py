"""Garbage collection: drop history outside the PITR window without ever breaking a branch.

Cutoff = min(space cutoff, time cutoff): the space cutoff keeps the last
`gc_horizon` bytes of WAL, the time cutoff keeps `pitr_interval` of commits.
It only moves forward and is persisted (in the layer index) before anything
is deleted. Below it we keep exactly what the retained points need: every
child branch point and every leased LSN (time-travel endpoints), plus the
cutoff itself, needs its newest image at or below it and the WAL from that
image's redo point. Images are full-keyspace, so delta layers that end at or
below the oldest kept image are covered by it and go too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from neonctl.engine.lsn import format_lsn
from neonctl.engine.pageserver.config import PageserverConfig
from neonctl.engine.pageserver.images.image_set import ImageInfo
from neonctl.engine.timepoint import unix_to_pg_us

log = logging.getLogger("pageserver.gc")


@dataclass
class GcResult:
    timeline_id: str
    cutoff: int
    space_cutoff: int
    time_cutoff: int
    retained_points: list[int]
    images_removed: list[str] = field(default_factory=list)
    deltas_removed: list[str] = field(default_factory=list)
    wal_segments_removed: list[int] = field(default_factory=list)
    bytes_freed: int = 0
    wal_kept_from: int = 0
    dry_run: bool = False

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        for k in ("cutoff", "space_cutoff", "time_cutoff", "wal_kept_from"):
            d[k] = format_lsn(d[k])
        d["retained_points"] = [format_lsn(p) for p in self.retained_points]
        return d


def time_cutoff(tl, pitr_interval: float, now: float) -> int:
    """The newest LSN older than the PITR window: the last commit before the first one inside it."""
    horizon_us = unix_to_pg_us(now - pitr_interval)
    lsn = tl.meta.start_lsn
    for end_lsn, xact_time in tl.commit_history():
        if xact_time > horizon_us:
            return min(max(lsn, tl.meta.start_lsn), tl.last_record_lsn)
        lsn = max(lsn, end_lsn)
    return tl.last_record_lsn  # nothing committed inside the window: all of it is older


def compute_cutoff(tl, config: PageserverConfig, now: float) -> tuple[int, int, int]:
    space = max(tl.meta.start_lsn, tl.last_record_lsn - config.gc_horizon)
    tcut = time_cutoff(tl, config.pitr_interval, now)
    cutoff = min(space, tcut)
    return max(cutoff, gc_cutoff(tl)), space, tcut


def gc_cutoff(tl) -> int:
    """The persisted cutoff (0 before the first GC)."""
    return tl.layers.map.extra.get("gc_cutoff", 0) if tl.layers is not None else 0


def gc_timeline(tl, retain: list[int], config: PageserverConfig, now: float | None = None,
                dry_run: bool = False) -> GcResult:
    now = time.time() if now is None else now
    with tl.layers.lock:
        cutoff, space, tcut = compute_cutoff(tl, config, now)
        points = sorted({p for p in retain if tl.meta.start_lsn <= p <= cutoff} | {cutoff})
        res = GcResult(tl.timeline_id, cutoff, space, tcut, points, dry_run=dry_run)
        own = tl.images()
        needed: dict[int, ImageInfo | None] = {}
        for p in points:
            mine = [i for i in own if i.lsn <= p]
            needed[p] = mine[-1] if mine else None  # None: served from an ancestor's image
        keep = {i.lsn for i in needed.values() if i is not None} | {i.lsn for i in own if i.lsn > cutoff}
        drop_images = [i for i in own if i.lsn not in keep]
        kept_below = [i for i in own if i.lsn in keep and i.lsn <= cutoff]
        # WAL: from the oldest redo point any retained point replays from
        if any(v is None for v in needed.values()) or not kept_below:
            min_wal = tl.meta.start_lsn
        else:
            min_wal = min(i.redo_lsn for i in kept_below)
        # ... and never WAL the layer builder has not turned into layers yet: it reads it from these segments
        min_wal = min(min_wal, getattr(tl, "layer_lsn", min_wal))
        seg = tl.meta.wal_seg_size
        res.wal_kept_from = min_wal
        res.wal_segments_removed = [s for s in tl.wal.segments() if (s + 1) * seg <= min_wal]
        oldest_kept_image = min((i.lsn for i in kept_below), default=None)
        drop_deltas = []
        if oldest_kept_image is not None:
            drop_deltas = [d for d in tl.layers.map.layers.values()
                           if d.kind == "delta" and d.lsn_end <= oldest_kept_image]
        res.images_removed = [name for i in drop_images for name in i.names]
        res.deltas_removed = [d.name for d in drop_deltas]
        res.bytes_freed = (sum(i.file_size for i in drop_images) + sum(d.file_size for d in drop_deltas)
                           + len(res.wal_segments_removed) * seg)
        if dry_run:
            return res
        # 1. the cutoff, the new image list and what this run removes are durable first, 2. then files go
        tl.layers.map.extra["gc_cutoff"] = cutoff
        if res.bytes_freed:  # what the last GC that removed anything removed (the explorer's `gc` view)
            tl.layers.map.extra["gc_last"] = {
                "at": now, "cutoff": cutoff,
                "removed": [{"kind": "image", "file": f.name, "bytes": f.file_size}
                            for i in drop_images for f in i.layers]
                + [{"kind": "delta", "file": d.name, "bytes": d.file_size} for d in drop_deltas]
                + [{"kind": "wal", "file": f"segment {s}", "bytes": seg} for s in res.wal_segments_removed]}
        dropped = {i.lsn for i in drop_images}
        tl.layers.map.extra["images"] = [d for d in tl.layers.map.extra.get("images", []) if d["lsn"] not in dropped]
        tl.layers.forget(res.images_removed + res.deltas_removed)
        for s in res.wal_segments_removed:
            tl.wal.remove_segment(s)
    if res.bytes_freed:
        log.info("timeline %s: gc cutoff %s freed %d bytes (%d images, %d deltas, %d WAL segments)",
                 tl.timeline_id, format_lsn(cutoff), res.bytes_freed, len(drop_images), len(drop_deltas),
                 len(res.wal_segments_removed))
    return res

