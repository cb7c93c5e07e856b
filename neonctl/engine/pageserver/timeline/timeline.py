"""A pageserver timeline: the storage truth for one branch.

A timeline is (ancestor timeline, ancestor LSN) plus its own WAL. The root
timeline starts from an imported initdb image (image layers at ``initdb_lsn``)
whose shutdown checkpoint ends at ``initdb_lsn``; everything after is
WAL ingested from the safekeepers, kept in segment files under the timeline's
id. ``last_record_lsn`` only ever points at the end of a complete, CRC-valid
record: that is the LSN a compute can be materialised at.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from neonctl.engine.compute.controldata import read_control_data
from neonctl.engine.lsn import (
    WAL_SEGMENT_SIZE,
    XLOG_BLCKSZ,
    format_lsn,
    segment_file_name,
)
from neonctl.engine.pageserver.commit_log import (
    CommitLog,
    commits_of,
    last_checkpoint_of,
)
from neonctl.engine.pageserver.config import PageserverConfig
from neonctl.engine.pageserver.images import warm
from neonctl.engine.pageserver.images.create import create_image
from neonctl.engine.pageserver.images.image_manifest import manifest_of
from neonctl.engine.pageserver.images.image_set import ImageInfo
from neonctl.engine.pageserver.images.materialize import (
    materialize_from_image,
    prepare_for_recovery,
)
from neonctl.engine.pageserver.images.rebuild import changed_rows
from neonctl.engine.pageserver.images.redo_cache import RedoDirCache
from neonctl.engine.pageserver.images.redo_worker import replay_to
from neonctl.engine.pageserver.images.replay_inits import (
    first_refs_from_wal,
    merge_first_refs,
    pages_replay_inits,
)
from neonctl.engine.pageserver.timeline.layer_manager import LayerStore, earliest_per_key, image_descs
from neonctl.engine.pageserver.timeline.layer_map import LayerMap
from neonctl.engine.pageserver.workdir import list_timelines, timeline_dir
from neonctl.engine.scratch import scratch
from neonctl.engine.wal.reader import WalDecodeError, WalStreamDecoder, find_end_of_wal
from neonctl.engine.wal.record_scan import RecordBatch, scan_wal
from neonctl.engine.wal.segments import SegmentedWal
from neonctl.errors import CorruptData, InvalidInput, NeonctlError, NotFound, PostgresError

# Files of a data directory that never belong in a stored image.
_EXCLUDED = {
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "backup_label.old",
    "tablespace_map",
    "recovery.signal",
    "standby.signal",
}

log = logging.getLogger("pageserver.timeline")


HANDOFF_LIMIT = 64 << 20  # bytes of scanned WAL the receiver may queue for the layer builder
HANDOFF_JOIN = 256 << 10  # the builder joins queued batches up to this much: joining saves per-call costs of
#                           small messages but copies, so a big batch is built on its own


@dataclass
class TimelineMetadata:
    timeline_id: str
    pg_version: int
    system_id: int
    ancestor_timeline: str | None
    ancestor_lsn: int
    initdb_lsn: int  # end of the base image's shutdown checkpoint record
    base_checkpoint_lsn: int
    base_redo_lsn: int
    last_record_lsn: int
    wal_seg_size: int = WAL_SEGMENT_SIZE
    start_lsn: int = 0  # first LSN of this timeline's own WAL (initdb_lsn, or the branch point)
    base_timeline: str | None = None  # the root timeline whose initdb image this one builds on
    created_at: float = 0.0
    last_checkpoint_lsn: int = 0  # start of the newest checkpoint record ingested


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _nobody() -> None:
    pass


def _layers_late(path, wait: float):
    """Wait up to `wait` s until each (timeline, lo, hi) of `path` has its layers built to hi; the first
    timeline that does not get there (or has no layers), else None."""
    deadline = time.monotonic() + wait
    for t, _lo, hi in path:
        if t.layers is not None and t.layer_lsn < hi:
            Timeline.layers_wanted()
        while t.layers is None or t.layer_lsn < hi:
            if t.layers is None or time.monotonic() > deadline:
                return t
            time.sleep(0.02)
    return None


class Timeline:
    # Wakes the pageserver's layer builder from its idle poll (set by the pageserver; any thread may call it):
    # a start that waits for the layers of a branch being written should not wait out a poll interval too.
    layers_wanted: Callable[[], None] = staticmethod(_nobody)

    def __init__(self, directory: Path, resolver: Callable[[str], Timeline] | None = None):
        self.dir = directory
        self.resolver = resolver
        self.layers: LayerStore | None = None  # attached only inside the pageserver process
        meta_path = directory / "metadata.json"
        if not meta_path.exists():
            raise NotFound(f"timeline {directory.name} does not exist in the pageserver")
        self.meta = TimelineMetadata(**json.loads(meta_path.read_text()))
        if not self.meta.start_lsn:
            self.meta.start_lsn = self.meta.initdb_lsn
        if not self.meta.base_timeline:
            self.meta.base_timeline = self.meta.timeline_id
        self.wal = SegmentedWal(directory / "wal", self.meta.wal_seg_size)
        self.commits = CommitLog(directory / "commits.bin")
        self._ancestor: Timeline | None = None
        self.received_lsn = self.meta.last_record_lsn
        self._sync_lock = threading.Lock()
        self.sk_flush_lsn = 0  # what the safekeeper we stream from has flushed
        self.remote_consistent_lsn: int | None = None  # last_record_lsn the remote holds (set by remote_sync)
        self._waiters: list = []
        self.last_ingest_at = float("-inf")  # monotonic time WAL last arrived (pageserver/pool_refill.py)

    def attach_layers(self, config: PageserverConfig, on_change=None) -> None:
        """Open the layer store; `build_layers` then turns WAL past its last frozen layer into layers."""
        self.layers = LayerStore(
            self.dir / "layers", self.timeline_id, self.meta.pg_version, self.meta.start_lsn, config, on_change
        )
        self.layer_lsn = self.layers.disk_consistent_lsn  # a record end: where the next scan starts
        self._layer_prev: int | None = None  # start of the record before layer_lsn, for the prev-link check
        self._layer_wal = SegmentedWal(self.dir / "wal", self.meta.wal_seg_size)  # own fds: another thread
        # batches the receiver has just scanned, handed to the builder so it need not read and scan them again
        self._handoff: deque[RecordBatch] = deque()
        self._handoff_bytes = 0
        self._handoff_lock = threading.Lock()

    def build_layers(self, budget: int = 16 << 20) -> int:
        """Turn WAL past `layer_lsn` into layers; return how many bytes were consumed.

        Runs on the pageserver's layer-builder thread, decoupled from WAL receipt,
        so a burst of WAL reaches durable storage at scan speed while layers
        catch up behind it. It takes the batches the receiver already scanned;
        only when those do not continue at `layer_lsn` (after a restart, or when
        the queue overflowed) does it read and scan about `budget` bytes of stored
        WAL itself (at least one whole record).
        """
        if self.layers is None:
            return 0
        start, limit = self.layer_lsn, self.meta.last_record_lsn
        if limit <= start:
            return 0
        want = min(limit - start, budget, max(self.layers.config.checkpoint_distance, 64 << 10))
        batch = self._take_handoff(start, want)
        if batch is None:  # read from disk only up to the next queued batch, so the builder joins the queue again
            nxt = self._handoff_head()
            if nxt is not None and nxt > start:
                want = min(want, nxt - start)
        while batch is None:
            scanned = scan_wal(
                self._read_layer_wal(start, want), start, self.meta.wal_seg_size, prev_lsn=self._layer_prev
            )
            if scanned.error is not None:
                raise scanned.error
            if len(scanned) or start + want >= limit:
                batch = scanned
            else:
                want = min(limit - start, want * 2)  # one record longer than the budget
        if not len(batch):  # below last_record_lsn there are whole records: the stored WAL lost them
            raise CorruptData(
                f"timeline {self.timeline_id}: no WAL records at {format_lsn(start)} in the stored"
                f" segments, though WAL was ingested up to {format_lsn(limit)}"
            )
        self.layers.put_batch(batch)
        self._layer_prev = int(batch.lsn[-1])
        self.layer_lsn = batch.end_lsn
        self.layers.maybe_freeze()
        return batch.end_lsn - start

    def _take_handoff(self, start: int, want: int) -> RecordBatch | None:
        """The receiver's batches that continue exactly at start, joined into one (small ones only: HANDOFF_JOIN)."""
        out: list[RecordBatch] = []
        with self._handoff_lock:
            q = self._handoff
            while q and q[0].start_lsn < start:  # built from disk, wholly or in part (the queue overflowed)
                self._handoff_bytes -= len(q.popleft().data)
            pos = start
            while q and q[0].start_lsn == pos and pos - start < min(want, HANDOFF_JOIN):
                b = q.popleft()
                self._handoff_bytes -= len(b.data)
                out.append(b)
                pos = b.end_lsn
        return RecordBatch.concat(out) if out else None

    def _handoff_head(self) -> int | None:
        with self._handoff_lock:
            return self._handoff[0].start_lsn if self._handoff else None

    def _hand_off(self, batch: RecordBatch) -> None:
        """Queue a freshly scanned batch for the layer builder (dropped when the builder is far behind)."""
        if self.layers is None or not len(batch):
            return
        with self._handoff_lock:
            if self._handoff_bytes + len(batch.data) > HANDOFF_LIMIT:
                return  # the builder reads this stretch from disk instead
            self._handoff.append(batch)
            self._handoff_bytes += len(batch.data)

    def _read_layer_wal(self, pos: int, length: int) -> np.ndarray:
        """Stored WAL for the layer builder (its own file handles; below the branch point, the parent's).

        A scratch buffer: the scan copies the records it keeps, and the next read reuses it.
        """
        out = scratch("layer-wal", length)
        view = memoryview(out)
        own = max(pos, self.meta.start_lsn) if self.ancestor is not None else pos
        if own > pos:  # the parent's WAL below the branch point
            n = min(own, pos + length) - pos
            view[:n] = self.ancestor.read_wal(pos, n)
        if own < pos + length:
            self._layer_wal.read_into(own, view[own - pos :])
        view.release()
        return out

    def maybe_freeze(self) -> None:
        if self.layers is not None:
            self.layers.maybe_freeze()

    def get_page_versions(self, key, lsn: int) -> tuple[list[tuple[int, bool, bytes]], bool]:
        """Versions of a page at lsn from this timeline's layers, then its ancestors' below the branch point.

        The layers must have caught up to lsn (the service's ``wait_layers_chain`` waits for that).
        """
        out: list = []
        t: Timeline | None = self
        while t is not None and t.layers is not None:
            vals, complete = t.layers.get_values(key, lsn)
            out.extend(vals)
            if complete or t.ancestor is None:
                return out, complete
            lsn = min(lsn, t.meta.start_lsn)
            t = t.ancestor
        return out, False

    def notify(self) -> None:
        """Wake coroutines waiting for ingest progress (called on the event loop)."""
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait_progress(self, timeout: float) -> None:
        import asyncio  # noqa: PLC0415

        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            if fut in self._waiters:  # timed out or cancelled: no notify will come for it
                self._waiters.remove(fut)

    @property
    def timeline_id(self) -> str:
        return self.meta.timeline_id

    @property
    def last_record_lsn(self) -> int:
        return self.meta.last_record_lsn

    @property
    def ancestor(self) -> Timeline | None:
        if self.meta.ancestor_timeline and self._ancestor is None:
            if self.resolver is not None:
                self._ancestor = self.resolver(self.meta.ancestor_timeline)
            else:
                self._ancestor = Timeline(self.dir.parent / self.meta.ancestor_timeline)
        return self._ancestor

    def read_wal(self, lsn: int, length: int) -> bytes:
        """WAL bytes as this timeline sees them: segments before its start come from the ancestors."""
        seg = self.meta.wal_seg_size
        out = bytearray()
        while length > 0:
            if lsn < self.meta.start_lsn and self.ancestor is not None:
                n = min(length, self.meta.start_lsn - lsn)  # below the branch point: the parent's WAL
                out += self.ancestor.read_wal(lsn, n)
            else:
                n = min(length, seg - lsn % seg)
                out += self.wal.read(lsn, n)
            lsn += n
            length -= n
        return bytes(out)

    def copy_wal(self, lsn: int, length: int, dst_fd: int, dst_off: int) -> None:
        """read_wal's bytes written into dst_fd at dst_off by the kernel (a compute's pg_wal, materialize.py)."""
        seg = self.meta.wal_seg_size
        while length > 0:
            if lsn < self.meta.start_lsn and self.ancestor is not None:
                n = min(length, self.meta.start_lsn - lsn)
                self.ancestor.copy_wal(lsn, n, dst_fd, dst_off)
            else:
                n = min(length, seg - lsn % seg)
                self.wal.copy_to(lsn, n, dst_fd, dst_off)
            lsn, length, dst_off = lsn + n, length - n, dst_off + n

    def record_end_at_or_before(self, lsn: int) -> int:
        """The end of the last WAL record that ends at or before lsn (an LSN a compute can start at)."""
        lsn = min(lsn, self.meta.last_record_lsn)
        page = lsn - lsn % XLOG_BLCKSZ
        floor = self._known_boundary_floor()
        while True:
            start = max(page, floor)
            decoder = WalStreamDecoder(start, self.meta.wal_seg_size)
            best = start if start == floor else None
            pos = start
            try:
                while pos < lsn:
                    chunk = self.read_wal(pos, min(1 << 20, lsn - pos + XLOG_BLCKSZ * 4))
                    decoder.feed(chunk)
                    pos += len(chunk)
                    while (rec := decoder.poll()) is not None:
                        if rec.end_lsn > lsn:
                            raise StopIteration
                        best = rec.end_lsn
            except (StopIteration, WalDecodeError):
                pass
            if best is not None or start <= floor:
                return best if best is not None else floor
            page -= XLOG_BLCKSZ

    def commit_history(self) -> list[tuple[int, int]]:
        """(commit end LSN, commit time) for every commit visible on this timeline, in LSN order."""
        own = self.commits.entries()
        inherited = []
        if self.ancestor is not None:
            inherited = [e for e in self.ancestor.commit_history() if e[0] <= self.meta.start_lsn]
        return sorted(dict(inherited + own).items())

    def lsn_for_timestamp(self, ts_us: int) -> int:
        """The LSN that includes every transaction committed at or before ts_us (Postgres µs since 2000).

        Scans commits in LSN order and stops before the first one stamped after
        ts_us. Raises if that point lies before this timeline's own start.
        """
        lsn = self._known_boundary_floor()
        for end_lsn, xact_time in self.commit_history():
            if end_lsn > self.meta.last_record_lsn:
                break
            if xact_time > ts_us:
                break
            lsn = end_lsn
        else:
            lsn = self.meta.last_record_lsn
        if lsn < self.meta.start_lsn:
            raise InvalidInput("that time is before this branch was created; use its parent instead")
        return lsn

    def _known_boundary_floor(self) -> int:
        """The lowest LSN readable on this timeline that is surely a record boundary."""
        t = self
        while t.ancestor is not None:
            t = t.ancestor
        return t.meta.initdb_lsn

    def save_metadata(self) -> None:
        _write_json_atomic(self.dir / "metadata.json", asdict(self.meta))

    # -- import ---------------------------------------------------------------

    @classmethod
    def import_initdb(cls, directory: Path, timeline_id: str, pgdata: Path, bin_dir: Path, pg_version: int) -> Timeline:
        """Make a root timeline from a cleanly shut down data directory (initdb's output)."""
        cd = read_control_data(bin_dir, pgdata)
        if cd.state != "shut down":
            raise PostgresError(f"cannot import {pgdata}: cluster state is {cd.state!r}, not 'shut down'")
        directory.mkdir(parents=True)
        wal = SegmentedWal(directory / "wal")
        segno = cd.checkpoint_lsn // WAL_SEGMENT_SIZE
        src = pgdata / "pg_wal" / segment_file_name(segno)
        data = src.read_bytes()
        wal.write(segno * WAL_SEGMENT_SIZE, data)
        end = find_end_of_wal(wal.read, cd.checkpoint_lsn, (segno + 1) * WAL_SEGMENT_SIZE)
        if end <= cd.checkpoint_lsn:
            raise PostgresError(f"cannot find the shutdown checkpoint record at {format_lsn(cd.checkpoint_lsn)}")
        wal.truncate(end)
        wal.close()
        # initdb's cluster is the timeline's first image: pages at initdb_lsn, recovery from its
        # shutdown checkpoint (the same form every later image has, made by the redo worker).
        info = create_image(pgdata, directory / "layers", timeline_id, end, cd.checkpoint_lsn, cd.redo_lsn)
        register_images(directory / "layers", [info])
        meta = TimelineMetadata(
            timeline_id=timeline_id,
            pg_version=pg_version,
            system_id=cd.system_id,
            ancestor_timeline=None,
            ancestor_lsn=0,
            initdb_lsn=end,
            base_checkpoint_lsn=cd.checkpoint_lsn,
            base_redo_lsn=cd.redo_lsn,
            last_record_lsn=end,
            start_lsn=end,
            base_timeline=timeline_id,
            created_at=time.time(),
        )
        _write_json_atomic(directory / "metadata.json", asdict(meta))
        return cls(directory)

    @classmethod
    def create_branch(cls, directory: Path, timeline_id: str, ancestor: Timeline, lsn: int) -> Timeline:
        """A child timeline at `lsn` (a record end on the ancestor): metadata and one WAL segment prefix."""
        a = ancestor.meta
        if not (a.start_lsn <= lsn <= a.last_record_lsn):
            raise InvalidInput(
                f"branch point {format_lsn(lsn)} is outside the parent's WAL"
                f" {format_lsn(a.start_lsn)}..{format_lsn(a.last_record_lsn)}"
            )
        directory.mkdir(parents=True)
        try:
            (directory / "wal").mkdir()  # empty: WAL below the branch point is read from the parent
            meta = TimelineMetadata(
                timeline_id=timeline_id,
                pg_version=a.pg_version,
                system_id=a.system_id,
                ancestor_timeline=a.timeline_id,
                ancestor_lsn=lsn,
                initdb_lsn=a.initdb_lsn,
                base_checkpoint_lsn=a.base_checkpoint_lsn,
                base_redo_lsn=a.base_redo_lsn,
                last_record_lsn=lsn,
                wal_seg_size=a.wal_seg_size,
                start_lsn=lsn,
                base_timeline=a.base_timeline,
                created_at=time.time(),
            )
            _write_json_atomic(directory / "metadata.json", asdict(meta))
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return cls(directory)

    # -- ingest ---------------------------------------------------------------

    def ingest(self, start_lsn: int, data: bytes) -> int:
        """Take WAL bytes [start_lsn, ...) from a safekeeper; return the new last_record_lsn.

        The stream always restarts at last_record_lsn, so a partial record at
        the tail is simply fetched again with the rest of it next time; bytes
        past the last complete record are never trusted.
        """
        if start_lsn != self.meta.last_record_lsn:
            raise InvalidInput(
                f"WAL for {self.timeline_id} must continue at {format_lsn(self.meta.last_record_lsn)},"
                f" got {format_lsn(start_lsn)}"
            )
        # a torn or overwritten tail (batch.error) is dropped: keep what was valid, fetch again later
        batch = scan_wal(data, start_lsn, self.meta.wal_seg_size)
        end = batch.end_lsn
        commits = commits_of(batch)
        ckpt = last_checkpoint_of(batch)
        if ckpt is not None:
            self.meta.last_checkpoint_lsn = ckpt
        if end > start_lsn:
            self.wal.write(start_lsn, data[: end - start_lsn])
            self.commits.append(commits)
            self.meta.last_record_lsn = end
            self.last_ingest_at = time.monotonic()  # the pool refill serves the busiest timeline
            self._hand_off(batch)
        # only now: a basebackup that sees received_lsn must also see last_record_lsn
        self.received_lsn = start_lsn + len(data)
        if end > start_lsn:
            self.sync_if_due()
        return end

    def sync_if_due(self, force: bool = False) -> None:
        """Make ingested WAL and then the metadata naming it durable - about once a second.

        The safekeepers keep the WAL, so after a crash the pageserver simply
        re-fetches from the persisted last_record_lsn; syncing every batch would
        put a second fsync on the disk the commit path waits for.
        """
        now = time.monotonic()
        if not force and now - getattr(self, "_last_sync", 0.0) < 1.0:
            return
        with self._sync_lock:  # the receiver and the layer builder both call this, from worker threads
            self._last_sync = now
            self.wal.flush()  # data first, then the metadata that points at it
            self.save_metadata()

    # -- materialisation ------------------------------------------------------

    def warm_reason(self, lsn: int, pool: Path) -> str | None:
        """Why the stopped directory `pool` is not exactly the data directory at `lsn`; None when it is."""
        lineage = {self.timeline_id}
        if lsn == self.meta.start_lsn and self.meta.ancestor_timeline:  # a child with no WAL of its own yet
            lineage.add(self.meta.ancestor_timeline)
        return warm.reusable(pool, lsn, self.timeline_id, lineage, self.meta.system_id, self.read_wal,
                             self.meta.wal_seg_size)

    def rebuild_cost(self, lsn: int, pool: Path, wait: float = 5.0) -> tuple[int | None, str | None]:
        """(how many keys a rebuild of the stopped directory `pool` at `lsn` rewrites, None) - or (None, why
        it cannot be rebuilt from)."""
        try:
            why, plan = self._rebuild_plan(lsn, pool, wait)
        except (NeonctlError, OSError) as e:
            return None, f"{type(e).__name__}: {e}"
        return (None, why) if plan is None else (len(plan[1]), None)

    def reuse_stopped(self, lsn: int, target: Path, pool: Path) -> dict | None:
        """Take the cleanly stopped compute directory `pool` as the data directory at `lsn` if it is exactly
        that (images/warm.py): returns its record (whose `start_lsn` - when its first compute started - the
        next record must carry on); None, with the reason logged, when it is not."""
        why = self.warm_reason(lsn, pool)
        if why is not None:
            log.info("timeline %s: the stopped compute directory is not reused at %s: %s", self.timeline_id,
                     format_lsn(lsn), why)
            return None
        record = warm.read_record(pool) or {}
        warm.take(pool, target)
        log.info("timeline %s: warm start at %s: the stopped compute directory is exactly that point",
                 self.timeline_id, format_lsn(lsn))
        return record

    def rebuild_stopped(self, lsn: int, target: Path, pool: Path, wait: float = 5.0) -> dict | None:
        """Materialise at `lsn` in the cleanly stopped compute directory `pool` by rewriting only the pages its
        history changed since the image this point starts from (images/rebuild.py); None, with the reason
        logged, when that history is not known exactly (the directory then goes the full way)."""
        t0 = time.perf_counter()
        try:
            why, plan = self._rebuild_plan(lsn, pool, wait)
        except (NeonctlError, OSError) as e:  # e.g. the history's timeline deleted meanwhile
            why, plan = f"{type(e).__name__}: {e}", None
        if plan is None:
            log.info("timeline %s: no incremental rebuild at %s: %s", self.timeline_id, format_lsn(lsn), why)
            return None
        image, rewrite, left = plan
        t1 = time.perf_counter()
        if target.exists():
            target.rmdir()
        os.rename(pool, target)
        os.chmod(target, 0o700)
        warm.forget(pool)
        try:
            wal = materialize_from_image(image, self.read_wal, lsn, target, seg_size=self.meta.wal_seg_size,
                                         copy_wal=self.copy_wal, changed=rewrite, left=left)
        except Exception as e:  # noqa: BLE001 - logged; the caller materialises the full way instead
            log.warning("timeline %s: incremental rebuild at %s failed (%s); materialising afresh",
                        self.timeline_id, format_lsn(lsn), e)
            shutil.rmtree(target, ignore_errors=True)  # half rewritten: never a pool again
            return None
        log.info("timeline %s: rebuilt at %s from a stopped compute: %d changed key(s) rewritten, %d left to the "
                 "replay's page images, %d WAL bytes to replay (history %.0f ms, files %.0f ms)", self.timeline_id,
                 format_lsn(lsn), len(rewrite), len(left), wal, (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000)
        return {"changed_keys": len(rewrite), "left_to_replay": len(left), "wal_bytes": wal}

    def _rebuild_plan(self, lsn: int, pool: Path, wait: float):
        record = warm.read_record(pool)
        ctl = warm.control(pool)
        if record is None or ctl is None or "start_lsn" not in record:
            return "no record of the directory's history", None
        sysid, state, checkpoint = ctl.system_id, ctl.state, ctl.checkpoint
        from_image = record.get("from_image")
        if sysid != self.meta.system_id:
            return "another system", None
        if from_image is not None:
            # an image's files, written by the pool refill and never started: exactly that image's point,
            # and no compute ran there to set a hint bit the WAL does not have
            if int(from_image) != int(record["start_lsn"]):
                return "a refilled directory's record does not agree with itself", None
            checkpoint = int(from_image)
        elif state != warm.DB_SHUTDOWNED:
            return "not a clean shutdown of this system", None
        elif not warm.logged_hints(pool):
            return "its compute ran without wal_log_hints", None
        image = self.image_for(lsn)
        if image.lsn > int(record["start_lsn"]):
            return "its compute started before the image (hint bits set then may be unlogged)", None
        try:
            t = self.resolver(record["timeline_id"]) if self.resolver else open_timeline(
                self.dir.parent.parent, record["timeline_id"])
        except NotFound:
            return "the timeline it ran on is gone", None
        path, hi = [], checkpoint
        while True:
            if t.layers is None:
                return f"timeline {t.timeline_id} is not attached", None
            if t.timeline_id == image.timeline_id:
                if image.lsn > hi:
                    return "its history does not pass through the image", None
                path.append((t, image.lsn, hi))
                break
            path.append((t, t.meta.start_lsn, hi))
            hi, t = t.meta.start_lsn, t.ancestor
            if t is None:
                return "its history does not pass through the image", None
        late = _layers_late(path, wait)  # every key it wrote must be in a layer: wait for the layer builder
        if late is not None:
            return f"timeline {late.timeline_id} has layers only up to {format_lsn(late.layer_lsn)}", None
        changed: set = set()
        for t, lo, hi in path:
            changed |= t.layers.keys_written(lo, hi)
        rows = changed_rows(changed)
        if not len(rows):  # nothing to spare the rebuild: no need to know what the replay rewrites
            return None, (image, rows, rows)
        left = np.isin(rows, self._replay_inits(image, lsn), assume_unique=True)
        return None, (image, rows[~left], rows[left])

    def _replay_inits(self, image, lsn: int) -> np.ndarray:
        """The pages the replay from `image` to `lsn` rewrites whole (images/replay_inits.py); the same for
        every kept directory weighed for one start, so the last answer is kept.

        Between the image's redo point and its LSN (the image's own checkpoint: little WAL) the WAL is read;
        after it, the layers' indexes along the target's history say the same without reading the WAL
        (39,000 index entries instead of 60 MB of WAL after a pgbench run). If those layers are not built
        yet, the WAL is read all the way."""
        cached = getattr(self, "_inits_cache", None)
        if cached is not None and cached[0] == (image.redo_lsn, lsn):
            return cached[1]
        t0 = time.perf_counter()
        seg = self.meta.wal_seg_size
        path = self._history_to(image, lsn)
        if path is None:
            keys = pages_replay_inits(self.read_wal, image.redo_lsn, lsn, seg)
            how = "the WAL"
        else:
            earlier = first_refs_from_wal(self.read_wal, image.redo_lsn, image.lsn, seg)
            parts = [t.layers.first_writes(lo, hi) for t, lo, hi in path]
            later_keys, _lsns, later_init = earliest_per_key(*(np.concatenate(col) for col in zip(*parts, strict=True)))
            keys = merge_first_refs(earlier, (later_keys, later_init))
            how = "the layers"
        self._inits_cache = ((image.redo_lsn, lsn), keys)
        log.info("timeline %s: the replay from %s to %s rewrites %d page(s) whole (%.0f ms, from %s)",
                 self.timeline_id, format_lsn(image.redo_lsn), format_lsn(lsn), len(keys),
                 (time.perf_counter() - t0) * 1000, how)
        return keys

    def _history_to(self, image, lsn: int, wait: float = 2.0) -> list | None:
        """[(timeline, lo, hi)]: the LSN ranges of this timeline's history from the image's LSN up to `lsn`,
        each timeline's layers built that far - or None when they are not within `wait` seconds."""
        path, t, hi = [], self, lsn
        while t is not None and t.timeline_id != image.timeline_id:
            path.append((t, t.meta.start_lsn, hi))
            hi, t = t.meta.start_lsn, t.ancestor
        if t is None or image.lsn > hi:
            return None
        path.append((t, image.lsn, hi))
        return path if _layers_late(path, wait) is None else None

    def materialize(self, lsn: int, target: Path, recycle: Path | None = None) -> int:
        """Build a data directory that Postgres crash-recovers to exactly `lsn`; return WAL bytes to replay.

        The newest image at or below `lsn` + WAL from its redo point; the
        segment holding `lsn` is zeroed after it and no later segment is
        included; a ``backup_label`` names the image's checkpoint so that
        recovery replays from it - without it a clean base would silently
        skip all redo.
        """
        if not (self.meta.start_lsn <= lsn <= self.meta.last_record_lsn):
            raise InvalidInput(
                f"LSN {format_lsn(lsn)} is outside {format_lsn(self.meta.start_lsn)}.."
                f"{format_lsn(self.meta.last_record_lsn)} for timeline {self.timeline_id}"
            )
        if target.exists() and any(target.iterdir()):
            raise InvalidInput(f"target directory {target} is not empty")
        image = self.image_for(lsn)
        if recycle is not None and recycle.is_dir() and not recycle.is_symlink():
            # A stopped compute's directory: its files are rewritten in place (restore_image). Any
            # failure falls back to an empty directory - the recycled one was only a pool of inodes.
            try:
                if target.exists():
                    target.rmdir()
                os.rename(recycle, target)
                os.chmod(target, 0o700)
                return materialize_from_image(
                    image, self.read_wal, lsn, target, seg_size=self.meta.wal_seg_size, recycle=True,
                    copy_wal=self.copy_wal,
                )
            except Exception as e:  # noqa: BLE001 - logged, then the plain way
                log.warning(
                    "timeline %s: materialising into the recycled %s failed (%s); starting afresh",
                    self.timeline_id,
                    recycle,
                    e,
                )
                shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True, exist_ok=True)
        os.chmod(target, 0o700)
        return materialize_from_image(image, self.read_wal, lsn, target, seg_size=self.meta.wal_seg_size,
                                      copy_wal=self.copy_wal)

    # -- images ---------------------------------------------------------------

    def images(self) -> list[ImageInfo]:
        """This timeline's own images, oldest first."""
        if self.layers is not None:
            raw = self.layers.map.extra.get("images", [])
        else:
            index = self.dir / "layers" / "index_part.json"
            raw = json.loads(index.read_text()).get("extra", {}).get("images", []) if index.exists() else []
        return sorted((ImageInfo.from_dict(d) for d in raw), key=lambda i: i.lsn)

    def image_for(self, lsn: int) -> ImageInfo:
        """The newest image at or below lsn, on this timeline or (below the branch point) its ancestors."""
        t: Timeline | None = self
        limit = lsn
        while t is not None:
            usable = [i for i in t.images() if i.lsn <= limit]
            if usable:
                return usable[-1]
            limit = min(limit, t.meta.start_lsn)
            t = t.ancestor
        raise InvalidInput(f"no image at or below {format_lsn(lsn)} for timeline {self.timeline_id}")

    def image_due(self, wal_threshold: int) -> bool:
        """Worth imaging: much WAL to replay since the newest image, and a checkpoint to restart from.

        "Much" is at least wal_threshold and at least the database's size (the newest image's pages):
        an image costs about one materialisation of the whole database, so a busy large database
        would otherwise spend a core re-imaging itself every few seconds of WAL.
        """
        newest = self.image_for(self.meta.last_record_lsn)
        pages = sum(layer.num_values for layer in newest.layers) * 8192
        return (
            self.meta.last_record_lsn - newest.redo_lsn >= max(wal_threshold, pages)
            and self.meta.last_checkpoint_lsn > newest.checkpoint_lsn
        )

    def create_image_at(self, lsn: int, runtime, scratch: Path, kept: RedoDirCache | None = None) -> ImageInfo | None:
        """Make an image at lsn with the redo worker; None when it would not shorten replay.

        With ``kept``, the redo worker starts from the directory the base image was made from when
        that is still there (instead of restoring the image), and the new directory is kept in turn.
        """
        base = self.image_for(lsn)
        work = Path(tempfile.mkdtemp(dir=scratch))
        os.chmod(work, 0o755)
        try:
            pgdata = work / "pgdata"
            if kept is not None and kept.take(base.timeline_id, base.lsn, pgdata):
                prepare_for_recovery(
                    pgdata,
                    self.read_wal,
                    lsn,
                    base.checkpoint_lsn,
                    base.redo_lsn,
                    "standby",
                    f"neonctl redo {base.timeline_id}@{format_lsn(base.lsn)} -> {format_lsn(lsn)}",
                    self.meta.wal_seg_size,
                )
            else:
                self.materialize(lsn, pgdata)
            res = replay_to(runtime, pgdata, lsn, log_file=work / "redo.log")
            if res.redo_lsn <= base.redo_lsn:
                return None  # no checkpoint replayed since the base image: nothing gained
            info = create_image(pgdata, self.dir / "layers", self.timeline_id, lsn, res.checkpoint_lsn, res.redo_lsn)
            if kept is not None:
                kept.keep(self.timeline_id, info.lsn, pgdata)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if self.layers is not None:
            self.layers.add_images(info)
        else:
            register_images(self.dir / "layers", [info])
        manifest_of(info.paths)  # now, while its layers are cached: the first rebuild from it costs no more
        return info


def register_images(layers_dir: Path, infos: list[ImageInfo]) -> None:
    """Add images to a layer index that no pageserver has open (import, offline tools)."""
    m = LayerMap(layers_dir)
    m.load(cleanup=False)  # the new image files are on disk but not yet in the index
    m.extra.setdefault("images", []).extend(i.to_dict() for i in infos)
    m.replace([d for i in infos for d in image_descs(i)], [])


def open_timeline(workdir: Path, timeline_id: str, resolver=None) -> Timeline:
    return Timeline(workdir / "timelines" / timeline_id, resolver)


__all__ = ["Timeline", "TimelineMetadata", "open_timeline", "list_timelines", "timeline_dir"]
