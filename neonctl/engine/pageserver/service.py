"""The pageserver daemon: timelines, WAL ingest, and data directories on request.

  GET  /v1/status                         health and timelines
  GET  /v1/timeline/{tl}                  metadata, last_record_lsn, received_lsn, remote_consistent_lsn
  POST /v1/timeline/{tl}/basebackup       {endpoint, recycle?, lsn?, wait_for_lsn?, timeout?}: materialise a
                                          data directory; with no lsn, at the end of the WAL the
                                          safekeepers had (wait_for_lsn), rounded down to a record end
  POST /v1/timeline/{tl}/sync             make the WAL ingested so far durable now; answers the timeline's
                                          info, its last_record_lsn durable

At start-up, timelines that remote storage holds but the local disk lacks are
downloaded first (remote_restore); then a background thread keeps the remote a
consistent copy of every timeline (remote_sync).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import secrets
import shutil
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import aiohttp
from aiohttp import web

from neonctl.engine.compute import dir_pool
from neonctl.engine.credentials import auth_headers
from neonctl.engine.daemon import error_middleware, json_body, serve, setup_logging
from neonctl.engine.failpoints import afailpoint
from neonctl.engine.lsn import format_lsn
from neonctl.engine.pageserver import pool_refill, value
from neonctl.engine.pageserver.config import PageserverConfig
from neonctl.engine.pageserver.images.getpage import page_at
from neonctl.engine.pageserver.images.redo_cache import RedoDirCache
from neonctl.engine.pageserver.key import Key
from neonctl.engine.pageserver.remote.download import restore_timelines
from neonctl.engine.pageserver.remote.storage import open_remote_storage
from neonctl.engine.pageserver.remote.upload import RemoteSync
from neonctl.engine.pageserver.timeline.gc import gc_cutoff, gc_timeline
from neonctl.engine.pageserver.timeline.layer_catalog import LayerCatalog
from neonctl.engine.pageserver.timeline.timeline import (
    Timeline,
    list_timelines,
    open_timeline,
    timeline_dir,
)
from neonctl.engine.pageserver.timeline.walreceiver import receive
from neonctl.engine.pageserver.workdir import DELETED_PREFIX
from neonctl.engine.timepoint import from_pg_us
from neonctl.errors import (
    AlreadyExists,
    Conflict,
    InvalidInput,
    NeonctlError,
    NotFound,
    Timeout,
)

ENDPOINT_DIR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
log = logging.getLogger("pageserver")
LEASE_SECONDS = 3600.0  # an explicit-LSN basebackup (time travel) keeps its history this long


def page_lsn(page: bytes) -> int:
    """pd_lsn from a Postgres page header: two little-endian u32 halves."""
    hi, lo = struct.unpack_from("<II", page, 0)
    return hi << 32 | lo


# The idle layer builder looks for new WAL this often. Two CI-style runs stalled while the builder waited on an
# asyncio.Event instead (woken by WAL, then by requests); the cause was not found, so it polls.
BUILDER_IDLE_POLL = 0.1
REFILL_POLL = 1.0  # s between looks at whether the directory pool wants a refill
REFILL_AFTER = 3.0  # s the pool must stay below its size, and without a start, before it is refilled

class Pageserver:
    def __init__(self, workdir: Path, broker: str | None, safekeepers: list[str]):
        self.workdir = workdir
        self.broker = broker
        self.safekeepers = safekeepers
        self.timelines: dict[str, Timeline] = {}
        self.broker_view: dict[str, dict] = {}
        self.receivers: dict[str, asyncio.Task] = {}
        self.stop_event: asyncio.Event | None = None
        self.branch_lock = asyncio.Lock()
        self.config = PageserverConfig.load(workdir)
        self.runtime = None
        self.scratch: Path | None = None
        self.compute_root: Path | None = None  # computes' directories: endpoints/<name>/pgdata, pool/
        self.redo_kept: RedoDirCache | None = None  # the redo worker's last directory (with scratch)
        self.image_lock = asyncio.Lock()
        self.leases: dict[tuple[str, int], float] = {}  # (timeline, lsn) -> expiry (monotonic)
        self.catalog = LayerCatalog(workdir / "layers.duckdb")
        self.remote: RemoteSync | None = None  # the uploader, once remote storage is open
        self.materialising = 0  # starts building a directory now: the pool refill waits for them
        self.refill: asyncio.Task | None = None  # the pool refill under way (cancelled by a start)
        self.last_materialised = float("-inf")  # monotonic time the last start's directory was ready

    def load(self) -> None:
        for grave in (self.workdir / "timelines").glob(f"{DELETED_PREFIX}*"):  # a delete a crash interrupted
            shutil.rmtree(grave, ignore_errors=True)
        for tid in list_timelines(self.workdir):
            self._load_one(tid)

    def _load_one(self, tid: str) -> Timeline:
        tl = self.timelines.get(tid)
        if tl is None:
            tl = open_timeline(self.workdir, tid, resolver=self._resolve)
            self.timelines[tid] = tl
            tl.attach_layers(self.config, self._layers_changed)
            self.catalog.sync(tid, list(tl.layers.map.layers.values()))
            log.info("loaded timeline %s at %s", tid, format_lsn(tl.last_record_lsn))
        return tl

    def _layers_changed(self, tid: str, layers: list) -> None:
        """A layer was frozen, compacted or GC'd: update the catalog and upload the change soon."""
        self.catalog.sync(tid, layers)
        if self.remote is not None:
            self.remote.wake()

    def _resolve(self, tid: str) -> Timeline:
        return self._load_one(tid)

    def get(self, tid: str) -> Timeline:
        if tid not in self.timelines:
            self.load()  # a timeline created on disk since start-up
        tl = self.timelines.get(tid)
        if tl is None:
            raise NotFound(f"timeline {tid} not found in the pageserver")
        return tl

    def info(self, tl: Timeline) -> dict:
        try:  # what a start at the head replays from (a compute started before it cannot be rebuilt to it)
            newest_image = tl.image_for(tl.last_record_lsn).lsn
        except NeonctlError:
            newest_image = None
        return {**asdict(tl.meta), "received_lsn": tl.received_lsn, "sk_flush_lsn": tl.sk_flush_lsn,
                "newest_image_lsn": newest_image,
                "layer_lsn": getattr(tl, "layer_lsn", None),
                "disk_consistent_lsn": tl.layers.disk_consistent_lsn if tl.layers else None,
                "remote_consistent_lsn": tl.remote_consistent_lsn}

    async def status(self, request: web.Request) -> web.Response:
        kept = self.redo_kept
        return json_body({"timelines": {k: self.info(v) for k, v in self.timelines.items()},
                          "broker_version": getattr(self, "broker_version", None),
                          "redo_kept": {"hits": kept.hits, "misses": kept.misses} if kept else None})

    async def timeline_info(self, request: web.Request) -> web.Response:
        return json_body(self.info(self.get(request.match_info["tl"])))

    async def basebackup(self, request: web.Request) -> web.Response:
        tl = self.get(request.match_info["tl"])
        self.ensure_receiver(tl)
        body = await request.json()
        target, pool = self.compute_paths(body.get("endpoint"), bool(body.get("recycle")))
        timeout = float(body.get("timeout", 60))
        deadline = time.monotonic() + timeout
        wait_for = body.get("wait_for_lsn")
        lsn = body.get("lsn")
        if not isinstance(wait_for if lsn is None else lsn, int):
            raise InvalidInput("basebackup needs an integer lsn or wait_for_lsn")
        target_lsn = int(wait_for if lsn is None else lsn)
        # Until we hold the WAL up to the requested point, wait for the walreceiver.
        while (tl.received_lsn if lsn is None else tl.last_record_lsn) < target_lsn:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(f"pageserver has WAL up to {format_lsn(tl.received_lsn)} of timeline"
                              f" {tl.timeline_id}, waited {timeout:.0f}s for {format_lsn(target_lsn)}")
            await tl.wait_progress(min(remaining, 1.0))
        at = tl.last_record_lsn if lsn is None else int(lsn)
        if lsn is not None:
            self.check_not_gced(tl, at)
            self.leases[(tl.timeline_id, at)] = time.monotonic() + LEASE_SECONDS
        self.materialising += 1
        if self.refill is not None:  # the refill is ahead of need; this start is the need
            self.refill.cancel()
        try:
            reused, rebuilt = await asyncio.to_thread(self._materialise_from_pool, tl, at, lsn is None, target, pool)
        finally:
            self.materialising -= 1
            self.last_materialised = time.monotonic()
        warm = reused is not None
        # A reused directory has run computes since it was last made from an image: the earliest of their
        # start LSNs is what its next record must name (images/rebuild.py's hint-bit rule).
        since = reused.get("start_lsn") if warm else None
        return json_body({"lsn": at, "timeline_id": tl.timeline_id, "warm": warm, "rebuilt": rebuilt,
                          "directory_since_lsn": since})

    def compute_paths(self, endpoint, recycle: bool) -> tuple[Path, Path | None]:
        """Where an endpoint's data directory goes, derived from its validated name: no request names a path
        (the pageserver may run as root; a path from a request would let any caller move and wipe one)."""
        if self.compute_root is None:
            raise InvalidInput("this pageserver was started without --compute-root: it cannot materialise")
        if not isinstance(endpoint, str) or not ENDPOINT_DIR_RE.match(endpoint.replace("/", "_")):
            raise InvalidInput(f"invalid endpoint name {endpoint!r}")
        target = self.compute_root / "endpoints" / endpoint.replace("/", "_") / "pgdata"
        pool = dir_pool.pool_root(self.compute_root)  # the stopped computes' directories (compute/dir_pool.py)
        return target, (pool if recycle and dir_pool.has_directory(pool) else None)

    def _materialise_from_pool(self, tl: Timeline, at: int, at_head: bool, target: Path,
                               pool: Path | None) -> tuple[dict | None, dict | None]:
        """Build the data directory at `at` from the pool's best stopped directory: one that is exactly that
        point (warm), else the one with the fewest changed pages to rewrite (rebuilt), else a full restore into
        the oldest one's files. Returns (warm record, rebuild summary), both None for a full restore."""
        chosen, how = None, "full"
        if pool is not None:
            with dir_pool.locked(pool):
                slots = dir_pool.slots(pool)
                if at_head:
                    chosen = next((s for s in slots if tl.warm_reason(at, s / "pgdata") is None), None)
                    how = "warm" if chosen is not None else how
                    if chosen is None:
                        t0 = time.perf_counter()
                        plans = [tl.rebuild_cost(at, s / "pgdata", wait=5.0 if i == 0 else 1.0)
                                 for i, s in enumerate(slots)]
                        costs = [(c, i) for i, (c, _why) in enumerate(plans) if c is not None]
                        if costs:
                            chosen, how = slots[min(costs)[1]], "rebuild"
                        per_slot = {s.name: c if c is not None else why
                                    for s, (c, why) in zip(slots, plans, strict=True)}
                        log.info("timeline %s: pages to rewrite per kept directory %s (weighed in %.0f ms)",
                                 tl.timeline_id, per_slot, (time.perf_counter() - t0) * 1000)
                if chosen is None and slots:
                    chosen = slots[-1]  # the oldest: its files are a pool of inodes for the full restore
                if chosen is not None:  # out of the listing: no eviction or other start touches it now
                    taken = chosen.with_name(f".taken-{chosen.name}")
                    os.rename(chosen, taken)
                    chosen = taken
        try:
            pgdata = chosen / "pgdata" if chosen is not None else None
            if how == "warm":
                reused = tl.reuse_stopped(at, target, pgdata)
                if reused is not None:
                    return reused, None
            if how in ("warm", "rebuild"):
                rebuilt = tl.rebuild_stopped(at, target, pgdata)
                if rebuilt is not None:
                    return None, rebuilt
            if pgdata is not None and not pgdata.is_dir():
                pgdata = None  # a failed rebuild removed it
            tl.materialize(at, target, pgdata)
            return None, None
        finally:
            if chosen is not None:
                shutil.rmtree(chosen, ignore_errors=True)

    async def create_branch(self, request: web.Request) -> web.Response:
        """Create a child timeline at an LSN or a time of its ancestor; copies no data."""
        tid = request.match_info["tl"]
        body = await request.json()
        if tid in self.timelines or timeline_dir(self.workdir, tid).exists():
            raise AlreadyExists(f"timeline {tid} already exists")
        ancestor = self.get(body["ancestor_timeline_id"])
        wait_for = body.get("wait_for_lsn")
        if wait_for is not None:  # the parent's head as the safekeepers know it
            await self.wait_received(ancestor, int(wait_for), float(body.get("timeout", 30)))
        async with self.branch_lock:
            if body.get("timestamp_us") is not None:
                lsn = ancestor.lsn_for_timestamp(int(body["timestamp_us"]))
            elif body.get("lsn") is not None:
                want = int(body["lsn"])
                deadline = time.monotonic() + 5  # WAL the compute has written but not yet flushed
                while want > ancestor.last_record_lsn and time.monotonic() < deadline:
                    await ancestor.wait_progress(0.2)
                if want > ancestor.last_record_lsn:
                    raise InvalidInput(f"LSN {format_lsn(want)} is past the parent's head"
                                       f" {format_lsn(ancestor.last_record_lsn)}")
                if want < ancestor.meta.start_lsn:
                    raise InvalidInput(f"LSN {format_lsn(want)} is before the parent's start"
                                       f" {format_lsn(ancestor.meta.start_lsn)}")
                lsn = await asyncio.to_thread(ancestor.record_end_at_or_before, want)
            else:
                lsn = ancestor.last_record_lsn
            self.check_not_gced(ancestor, lsn)
            await asyncio.to_thread(Timeline.create_branch, timeline_dir(self.workdir, tid), tid, ancestor, lsn)
            tl = await asyncio.to_thread(self._load_one, tid)
        self.ensure_receiver(tl)
        await afailpoint("ps-timeline-create-before-answer")
        return json_body(self.info(tl))

    async def lsn_by_timestamp(self, request: web.Request) -> web.Response:
        tl = self.get(request.match_info["tl"])
        lsn = await asyncio.to_thread(tl.lsn_for_timestamp, int(request.query["timestamp_us"]))
        return json_body({"lsn": lsn})

    async def record_end(self, request: web.Request) -> web.Response:
        """The end of the last complete record at or before ?lsn= (where a compute can stop replay)."""
        tl = self.get(request.match_info["tl"])
        lsn = await asyncio.to_thread(tl.record_end_at_or_before, int(request.query["lsn"]))
        return json_body({"lsn": lsn})

    async def commits(self, request: web.Request) -> web.Response:
        tl = self.get(request.match_info["tl"])
        return json_body({"commits": await asyncio.to_thread(tl.commit_history)})

    async def delete_timeline(self, request: web.Request) -> web.Response:
        tid = request.match_info["tl"]
        tl = self.get(tid)
        children = [t for t in self.timelines.values() if t.meta.ancestor_timeline == tid]
        if children:
            raise Conflict(f"timeline {tid} has child timelines")
        if self.remote is not None:  # remote first: a timeline left only remotely would be restored at start-up
            await asyncio.to_thread(self.remote.delete_timeline, tid)
        if self.timelines.get(tid) is not tl:
            return json_body({"deleted": tid})  # a concurrent delete got here first
        task = self.receivers.pop(tid, None)
        if task:
            task.cancel()
        self.timelines.pop(tid)
        tl.wal.close()
        if tl.layers is not None:
            tl.layers.close()
        self.catalog.drop(tid)
        if self.redo_kept is not None:
            await asyncio.to_thread(self.redo_kept.forget, tid)
        # One rename first: a crash during the removal must not leave a half-deleted timeline to be loaded.
        grave = tl.dir.with_name(f"{DELETED_PREFIX}{tid}-{secrets.token_hex(4)}")
        try:
            await asyncio.to_thread(os.rename, tl.dir, grave)
        except FileNotFoundError:  # no directory left to remove (as the removal loop below already allowed)
            return json_body({"deleted": tid})
        await afailpoint("ps-timeline-delete-midway")
        # The layer builder or an ingest already under way may still write a file or two in there.
        for attempt in range(50):
            try:
                await asyncio.to_thread(shutil.rmtree, grave)
                break
            except FileNotFoundError:
                break
            except OSError:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.1)
        return json_body({"deleted": tid})

    async def wait_received(self, tl: Timeline, lsn: int, timeout: float) -> None:
        self.ensure_receiver(tl)
        deadline = time.monotonic() + timeout
        while tl.received_lsn < lsn:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(f"pageserver has WAL up to {format_lsn(tl.received_lsn)} of timeline"
                              f" {tl.timeline_id}, waited {timeout:.0f}s for {format_lsn(lsn)}")
            await tl.wait_progress(min(remaining, 1.0))

    async def layers(self, request: web.Request) -> web.Response:
        tid = request.query.get("timeline")
        return json_body({"layers": await asyncio.to_thread(self.catalog.list, tid)})

    async def layer_stats(self, request: web.Request) -> web.Response:
        tl = self.get(request.match_info["tl"])
        stats = await asyncio.to_thread(self.catalog.stats, tl.timeline_id)
        stats["disk_consistent_lsn"] = tl.layers.disk_consistent_lsn
        stats["open_layer"] = {"start_lsn": tl.layers.open.start_lsn, "end_lsn": tl.layers.open.end_lsn,
                               "values": tl.layers.open.count, "bytes": tl.layers.open.size}
        return json_body(stats)

    async def sync(self, request: web.Request) -> web.Response:
        """Make the WAL ingested so far, and the metadata naming it, durable now (not within the second).

        The answer's last_record_lsn is durable: it is read before the sync, which covers it. A repair of a
        lone safekeeper rebuilds its timeline there, so a pageserver restart must never come back below it.
        """
        tl = self.get(request.match_info["tl"])
        info = self.info(tl)
        await asyncio.to_thread(tl.sync_if_due, True)
        return json_body(info)

    async def checkpoint(self, request: web.Request) -> web.Response:
        """Freeze the open layer now (and compact if due); `compact=true` forces a compaction too."""
        tl = self.get(request.match_info["tl"])
        body = await request.json() if request.can_read_body else {}
        if body.get("wait_for_lsn") is not None:
            await self.wait_received(tl, int(body["wait_for_lsn"]), float(body.get("timeout", 30)))
        await self.wait_layers(tl, tl.last_record_lsn, float(body.get("timeout", 30)))

        def run() -> None:
            tl.layers.maybe_freeze(force=True)
            if body.get("compact"):
                tl.layers.compact()

        await asyncio.to_thread(run)
        return json_body({"disk_consistent_lsn": tl.layers.disk_consistent_lsn})

    async def page_versions(self, request: web.Request) -> web.Response:
        """GetPage@LSN from layers: the versions a reconstruction needs, newest first."""
        tl = self.get(request.match_info["tl"])
        key = Key.parse(request.query["key"])
        lsn = int(request.query.get("lsn", tl.last_record_lsn))
        timeout = float(request.query.get("timeout", 30))
        await self.wait_received(tl, lsn, timeout)
        await self.wait_layers_chain(tl, lsn, timeout)
        vals, complete = await asyncio.to_thread(tl.get_page_versions, key, lsn)

        def describe(v_lsn: int, wi: bool, v: bytes) -> dict:
            page = value.page_image(v)
            return {"lsn": v_lsn, "will_init": wi, "kind": value.KIND_NAMES.get(v[0], str(v[0])),
                    "length": len(v) - 1, "page_lsn": page_lsn(page) if page is not None and len(page) > 8 else None}

        out = {"complete": complete, "versions": [describe(*v) for v in vals]}
        if request.query.get("page") in ("1", "true"):  # the page itself, replayed by Postgres where needed
            at = await asyncio.to_thread(page_at, tl, key, lsn, self.runtime, self.scratch)
            out["page"] = {"lsn": at.lsn, "source": at.source, "versions_replayed": at.versions_replayed,
                           "hex": at.page.hex() if at.page is not None else None}
        return json_body(out)

    def retained_points(self, tl: Timeline, leases: dict[str, list[int]]) -> list[int]:
        """LSNs of tl that must stay materialisable: child branch points and leases."""
        now = time.monotonic()
        pts = [c.meta.ancestor_lsn for c in self.timelines.values() if c.meta.ancestor_timeline == tl.timeline_id]
        pts += leases.get(tl.timeline_id, [])
        pts += [lsn for (tid, lsn), exp in self.leases.items() if tid == tl.timeline_id and exp > now]
        return pts

    def check_not_gced(self, tl: Timeline, lsn: int) -> None:
        cutoff = gc_cutoff(tl)
        if lsn < cutoff and lsn not in self.retained_points(tl, {}):
            commits = [t for e, t in tl.commit_history() if e >= cutoff]
            oldest_time = from_pg_us(commits[0]).isoformat() if commits else "its cutoff"
            raise InvalidInput(f"LSN {format_lsn(lsn)} is below the GC cutoff of {tl.timeline_id}:"
                               f" the oldest point kept is {format_lsn(cutoff)} ({oldest_time})")

    async def gc(self, request: web.Request) -> web.Response:
        """Run GC now: {timelines?: [ids], leases?: {tl: [lsn]}, dry_run?: bool}."""
        body = await request.json() if request.can_read_body else {}
        leases = {k: [int(x) for x in v] for k, v in body.get("leases", {}).items()}
        ids = body.get("timelines") or list(self.timelines)
        out = []
        for tid in ids:
            tl = self.get(tid)
            res = await asyncio.to_thread(gc_timeline, tl, self.retained_points(tl, leases), self.config,
                                          None, bool(body.get("dry_run")))
            out.append(res.to_json())
        return json_body({"results": out})

    async def gc_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and self.config.gc_period > 0:
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.config.gc_period)
                return
            except TimeoutError:
                pass
            for tl in list(self.timelines.values()):
                try:
                    await asyncio.to_thread(gc_timeline, tl, self.retained_points(tl, {}), self.config)
                except Exception:  # noqa: BLE001
                    self._log_failure(tl, "gc")

    async def create_image(self, request: web.Request) -> web.Response:
        """Make an image at the timeline's head now (the redo worker replays to it)."""
        tl = self.get(request.match_info["tl"])
        if self.runtime is None:
            raise Conflict("the pageserver was started without Postgres binaries (--pg-bin)")
        async with self.image_lock:  # check under the lock: the image loop may have just made one
            if tl.meta.last_checkpoint_lsn <= tl.image_for(tl.last_record_lsn).checkpoint_lsn:
                raise Conflict("no checkpoint since the newest image: an image now would not shorten replay",
                               hint="run CHECKPOINT on the branch's endpoint first")
            hits = self.redo_kept.hits if self.redo_kept else 0
            info = await asyncio.to_thread(tl.create_image_at, tl.last_record_lsn, self.runtime, self.scratch,
                                           self.redo_kept)
            kept = self.redo_kept is not None and self.redo_kept.hits > hits
        if info is None:
            raise Conflict("the redo worker found no newer checkpoint to restart from")
        return json_body({"lsn": info.lsn, "redo_lsn": info.redo_lsn, "checkpoint_lsn": info.checkpoint_lsn,
                          "layers": info.names, "file_size": info.file_size,
                          "redo_started_from": "kept directory" if kept else "restored image"})

    def _log_failure(self, tl, what: str) -> None:
        """A background step failed: an error, unless the timeline was deleted while it ran (its files
        went from under it), which is expected and only noted."""
        if self.timelines.get(tl.timeline_id) is tl:
            log.exception("%s of %s failed", what, tl.timeline_id)
        else:
            log.info("%s of %s stopped: the timeline was deleted meanwhile", what, tl.timeline_id)

    async def image_loop(self, stop: asyncio.Event) -> None:
        """Create images where much WAL piled up since the newest one, so compute starts replay little."""
        threshold = self.config.image_creation_threshold * self.config.checkpoint_distance
        while not stop.is_set() and self.runtime is not None:
            for tl in list(self.timelines.values()):
                try:
                    if tl.image_due(threshold):
                        async with self.image_lock:
                            info = await asyncio.to_thread(tl.create_image_at, tl.last_record_lsn, self.runtime,
                                                           self.scratch, self.redo_kept)
                        if info:
                            log.info("timeline %s: image at %s (redo from %s)", tl.timeline_id,
                                     format_lsn(info.lsn), format_lsn(info.redo_lsn))
                except Exception:  # noqa: BLE001 - logged; retried next round
                    self._log_failure(tl, "image creation")
            await asyncio.sleep(5)

    async def pool_refill_loop(self, stop: asyncio.Event) -> None:
        """Keep a directory of the busy timeline's newest image in the pool (pool_refill.py), between starts."""
        if self.compute_root is None:
            return
        root = dir_pool.pool_root(self.compute_root)
        short_since: float | None = None
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=REFILL_POLL)
                return
            except TimeoutError:
                pass
            await asyncio.to_thread(dir_pool.remove_evicted, root)  # what `endpoint stop` left to us
            await asyncio.to_thread(pool_refill.remove_leftovers, root)  # refills a start cancelled
            # Only a pool that stays short: between a start and the stop that gives a directory back (a test
            # suite, the start benchmark) a refill would only race the next start.
            now = time.monotonic()
            if not await asyncio.to_thread(pool_refill.short, root):
                short_since = None
                continue
            short_since = now if short_since is None else short_since
            if self.materialising or now - short_since < REFILL_AFTER or now - self.last_materialised < REFILL_AFTER:
                continue
            job = await asyncio.to_thread(pool_refill.plan, list(self.timelines.values()), root, time.monotonic())
            if job is not None:
                self.refill = asyncio.create_task(pool_refill.fill(job, root))
                try:
                    await self.refill
                except asyncio.CancelledError:
                    if stop.is_set() or not self.refill.cancelled():
                        raise
                    log.info("pool refill for %s given up: a start needs the machine", job.timeline_id)
                finally:
                    self.refill = None

    async def changed_pages(self, request: web.Request) -> web.Response:
        tl = self.get(request.match_info["tl"])
        upto = tl.last_record_lsn
        if "wait_for_lsn" in request.query:  # everything the safekeepers hold, not just what arrived so far
            try:
                upto = max(upto, int(request.query["wait_for_lsn"]))
            except ValueError:
                raise InvalidInput("wait_for_lsn must be an integer LSN") from None
            await self.wait_received(tl, upto, 30)
        await self.wait_layers(tl, upto, 30)
        changes = await asyncio.to_thread(tl.layers.changed_pages)
        return json_body({"since_lsn": tl.meta.start_lsn, "head_lsn": tl.last_record_lsn, "relations": [
            {"spc": t[0], "db": t[1], "rel": t[2], "fork": t[3], "pages": n} for t, n in sorted(changes.items())]})

    async def build_layers_loop(self, stop: asyncio.Event) -> None:
        """The layer builder: turn ingested WAL into layers, behind WAL receipt, one timeline at a time."""
        # Its own thread: in the shared pool, requests that wait for the layers to catch up could take
        # every worker and leave none for the builder they wait for.
        loop = asyncio.get_running_loop()
        builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-builder")
        wanted = asyncio.Event()
        Timeline.layers_wanted = staticmethod(lambda: loop.call_soon_threadsafe(wanted.set))
        failed: dict[str, str] = {}  # timeline -> the error last logged for it
        while not stop.is_set():
            busy = False
            for tl in list(self.timelines.values()):
                if self.timelines.get(tl.timeline_id) is not tl:
                    continue  # deleted meanwhile
                # Everything per timeline is inside the try: a timeline deleted under the builder makes its
                # sync or freeze raise (its directory is gone), and an escaped error would end this loop and
                # stall the layers of every other timeline.
                try:
                    await loop.run_in_executor(builder, tl.sync_if_due)
                    n = await loop.run_in_executor(builder, tl.build_layers)
                    if not n and tl.layers is not None:
                        await loop.run_in_executor(builder, tl.layers.maybe_freeze)  # time-based, while idle
                    failed.pop(tl.timeline_id, None)
                except Exception as e:  # noqa: BLE001 - keep the builder alive; the error is logged once
                    if self.timelines.get(tl.timeline_id) is not tl:
                        continue  # deleted while it was being built: nothing to report
                    if not tl.dir.exists():  # removed from under us (not through our delete): nothing to build
                        log.warning("timeline %s: its directory is gone; the pageserver forgets it", tl.timeline_id)
                        self.timelines.pop(tl.timeline_id, None)
                        task = self.receivers.pop(tl.timeline_id, None)
                        if task:
                            task.cancel()
                        continue
                    if failed.get(tl.timeline_id) != str(e):
                        log.exception("building layers for %s failed", tl.timeline_id)
                        failed[tl.timeline_id] = str(e)
                    n = 0
                busy = busy or n > 0
            if not busy:  # idle: look again soon, or at once when a start waits for the layers
                try:
                    await asyncio.wait_for(wanted.wait(), BUILDER_IDLE_POLL)
                except TimeoutError:
                    pass
                wanted.clear()

    async def wait_layers(self, tl: Timeline, lsn: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if tl.layer_lsn < lsn:
            Timeline.layers_wanted()
        while tl.layer_lsn < lsn:
            if time.monotonic() > deadline:
                raise Timeout(f"layers of {tl.timeline_id} reached {format_lsn(tl.layer_lsn)}, not {format_lsn(lsn)}")
            await asyncio.sleep(0.05)

    async def wait_layers_chain(self, tl: Timeline, lsn: int, timeout: float) -> None:
        """Until the layers of tl, and of its ancestors below each branch point, reach lsn.

        On the event loop, not in a worker thread: a thread blocked on the layer builder would hold a
        worker the builder's callers may need.
        """
        t: Timeline | None = tl
        while t is not None and t.layers is not None:
            await self.wait_layers(t, min(lsn, t.last_record_lsn), timeout)
            lsn = min(lsn, t.meta.start_lsn)
            t = t.ancestor

    def ensure_receiver(self, tl: Timeline) -> None:
        task = self.receivers.get(tl.timeline_id)
        if (task is None or task.done()) and self.stop_event is not None:
            self.receivers[tl.timeline_id] = asyncio.create_task(
                receive(tl, self.http, self.broker_view, self.safekeepers, self.stop_event))

    async def run(self, stop: asyncio.Event) -> None:
        self.stop_event = stop
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), headers=auth_headers())
        try:
            for tl in self.timelines.values():
                self.ensure_receiver(tl)
            await self.follow_broker(stop)
        finally:
            await self.http.close()

    async def follow_broker(self, stop: asyncio.Event) -> None:
        """Subscribe to the broker; keep the last known view while it is down."""
        version = -1
        while not stop.is_set():
            if not self.broker:
                await asyncio.sleep(1)
                continue
            try:
                async with self.http.get(f"http://{self.broker}/v1/subscribe",
                                         params={"after": version, "wait": 2}) as r:
                    r.raise_for_status()
                    msg = await r.json()
                if msg["version"] < version:  # the broker restarted
                    version = -1
                else:
                    version = msg["version"]
                self.broker_version = version
                for tid, per_sk in msg["timelines"].items():
                    self.broker_view[tid] = per_sk
                    if tid in self.timelines or tid in list_timelines(self.workdir):
                        self.ensure_receiver(self.get(tid))
            except (TimeoutError, aiohttp.ClientError, OSError):
                await asyncio.sleep(0.5)

    def shutdown(self) -> None:
        """Make ingested WAL and metadata durable, then bring the remote up to date with them."""
        for tl in list(self.timelines.values()):
            tl.sync_if_due(force=True)
        if self.remote is not None:
            self.remote.stop(final_round=True)

    def load_with_remote_storage(self) -> None:
        """Restore timelines the local disk lacks from remote storage, load everything, start uploading."""
        storage = open_remote_storage(self.config.remote_storage, self.workdir.parent)
        for tid in restore_timelines(self.workdir, storage):
            log.info("timeline %s restored from %s", tid, storage.url)
        self.load()
        self.remote = RemoteSync(storage, lambda: self.timelines.values())
        self.remote.start()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware])
        app["on_stop"] = self.shutdown
        app.router.add_get("/v1/status", self.status)
        app.router.add_get("/v1/timeline/{tl}", self.timeline_info)
        app.router.add_post("/v1/timeline/{tl}/basebackup", self.basebackup)
        app.router.add_post("/v1/timeline/{tl}/branch", self.create_branch)
        app.router.add_get("/v1/timeline/{tl}/lsn_by_timestamp", self.lsn_by_timestamp)
        app.router.add_get("/v1/timeline/{tl}/record_end", self.record_end)
        app.router.add_get("/v1/timeline/{tl}/commits", self.commits)
        app.router.add_delete("/v1/timeline/{tl}", self.delete_timeline)
        app.router.add_get("/v1/layers", self.layers)
        app.router.add_get("/v1/timeline/{tl}/layer_stats", self.layer_stats)
        app.router.add_post("/v1/timeline/{tl}/checkpoint", self.checkpoint)
        app.router.add_post("/v1/timeline/{tl}/sync", self.sync)
        app.router.add_get("/v1/timeline/{tl}/page", self.page_versions)
        app.router.add_get("/v1/timeline/{tl}/changed_pages", self.changed_pages)
        app.router.add_post("/v1/timeline/{tl}/image", self.create_image)
        app.router.add_post("/v1/gc", self.gc)
        return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="neonctl-pageserver")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--listen", default="127.0.0.1:9898")
    p.add_argument("--broker", default=None)
    p.add_argument("--safekeepers", default="", help="comma-separated host:port used when the broker is silent")
    p.add_argument("--pg-bin", default=None, help="Postgres bin dir for the redo worker (default: discovery)")
    p.add_argument("--scratch", type=Path, default=None, help="directory the Postgres user can write, for redo")
    p.add_argument("--compute-root", type=Path, default=None, help="the project's compute directory (basebackup)")
    args = p.parse_args(argv)
    setup_logging("pageserver")
    ps = Pageserver(args.workdir, args.broker, [s for s in args.safekeepers.split(",") if s])
    if args.scratch:
        from neonctl.engine.compute.runtime import resolve_runtime  # noqa: PLC0415

        ps.runtime = resolve_runtime(args.pg_bin or None)
        args.scratch.mkdir(parents=True, exist_ok=True)
        os.chmod(args.scratch, 0o755)
        ps.scratch = args.scratch
        ps.redo_kept = RedoDirCache(args.scratch)
    ps.compute_root = args.compute_root
    if args.compute_root is not None:  # directories a start had taken from the pool when we last died
        for leftover in dir_pool.pool_root(args.compute_root).glob(".taken-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        pool_refill.remove_leftovers(dir_pool.pool_root(args.compute_root))
    try:
        ps.load_with_remote_storage()
    except NeonctlError as e:  # misconfigured or unreachable remote storage, a damaged remote layer
        print(f"fatal: {e}", flush=True)
        raise SystemExit(1) from None
    host, port = args.listen.rsplit(":", 1)
    serve(ps.app(), host, int(port), [ps.run, ps.build_layers_loop, ps.image_loop, ps.gc_loop, ps.pool_refill_loop])
