"""Offloading timelines to remote storage, in the background and in durability order.

The remote holds, per timeline, everything a pageserver needs to be rebuilt from it
alone, under keys that mirror the local layout::

    timelines/<tl>/metadata.json            last_record_lsn, ancestry, base image LSNs
    timelines/<tl>/wal/<24-hex segment>     the timeline's own WAL (the last one cut at last_record_lsn)
    timelines/<tl>/layers/<layer file>      delta and image layers
    timelines/<tl>/layers/index_part.json   the remote commit point

A round takes a snapshot of the local index, metadata and WAL segment list under
the layer lock (so compaction or GC is not half-way through it), then uploads
immutable files first (the index's layer files, full WAL segments), then the
mutable ones (the partial last segment, metadata.json) and the index last. The
commit log is not uploaded: it grows forever and a restore rebuilds it from the
WAL in a few scans. Files the new index no longer lists (compacted or GC'd layers, GC'd
segments) are deleted remotely only after that upload. What the remote holds is
therefore always a consistent timeline, and ``remote_consistent_lsn`` - the
last_record_lsn of the metadata uploaded with the newest index - says up to where;
the walreceiver reports it to the safekeepers, which keep their WAL above it.

Rounds run on one thread of their own, about once a second (sooner after a layer
change), never on the WAL-receive or layer-build path; only every
``COMMIT_PERIOD`` (and at a clean stop) does a round go on to the partial
segment, metadata and index - re-sending up to a segment of WAL every second
would double the disk traffic of a busy compute. Files the remote already holds
at the right size are skipped: layer files and full segments are immutable, and
the partial segment's size is where it was cut.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from neonctl.engine.lsn import WAL_SEGMENT_SIZE, format_lsn, segment_file_name
from neonctl.engine.pageserver.remote.storage import RemoteStorage
from neonctl.engine.pageserver.workdir import INDEX

log = logging.getLogger("pageserver.remote_sync")

TIMELINES = "timelines/"
METADATA_KEY = "metadata.json"
INDEX_KEY = f"layers/{INDEX}"
COMMIT_PERIOD = 10.0  # seconds between remote commit points (partial segment, metadata, index)
# A timeline that has never frozen a layer has no index file yet; the remote still needs a commit point.
EMPTY_INDEX = json.dumps({"disk_consistent_lsn": 0, "extra": {}, "layers": []}, indent=1).encode()
PERIOD = 1.0


def timeline_prefix(timeline_id: str) -> str:
    return f"{TIMELINES}{timeline_id}/"


def remote_timelines(storage: RemoteStorage) -> dict[str, dict[str, int]]:
    """Every timeline the remote has files of: {timeline id: {key within the timeline: size}}."""
    out: dict[str, dict[str, int]] = {}
    for key, size in storage.list(TIMELINES).items():
        tid, _, rest = key[len(TIMELINES):].partition("/")
        if rest:
            out.setdefault(tid, {})[rest] = size
    return out


def delete_remote_timeline(storage: RemoteStorage, tid: str) -> int:
    """Remove a timeline's objects, its index first: a half-deleted timeline is never restored. Returns the count."""
    keys = storage.list(timeline_prefix(tid))
    first = [k for k in (timeline_prefix(tid) + INDEX_KEY, timeline_prefix(tid) + METADATA_KEY) if k in keys]
    storage.delete(first)
    storage.delete(k for k in keys if k not in first)
    return len(keys)


@dataclass
class Snapshot:
    """What one round makes the remote hold: taken at one instant, consistent with itself."""

    metadata: bytes
    index: bytes
    segments: list[int]
    last_record_lsn: int
    seg_size: int
    layers: dict[str, int]  # layer file name -> size, from the index


def take_snapshot(tl) -> Snapshot:
    """The timeline's durable state now: index, metadata and WAL segments, read under the layer lock."""
    with tl.layers.lock if tl.layers is not None else contextlib.nullcontext():
        try:
            index = (tl.dir / "layers" / INDEX).read_bytes()
        except FileNotFoundError:
            index = EMPTY_INDEX
        metadata = (tl.dir / "metadata.json").read_bytes()
        segments = tl.wal.segments()
    meta = json.loads(metadata)
    layers = {d["name"]: d["file_size"] for d in json.loads(index)["layers"]}
    return Snapshot(metadata, index, segments, meta["last_record_lsn"], meta.get("wal_seg_size", WAL_SEGMENT_SIZE),
                    layers)


class _TimelineState:
    def __init__(self) -> None:
        self.lock = threading.Lock()  # one round (or the deletion) of this timeline at a time
        self.remote: dict[str, int] | None = None  # what the remote holds: key within the timeline -> size
        self.sent_metadata: bytes | None = None
        self.sent_index: bytes | None = None
        self.deleted = False
        self.last_error: tuple[str, float] | None = None


class RemoteSync:
    """The pageserver's uploader: a background thread that keeps the remote a consistent copy of each timeline."""

    def __init__(self, storage: RemoteStorage, timelines: Callable[[], Iterable], period: float = PERIOD):
        self.storage = storage
        self.timelines = timelines  # the timelines to keep offloaded (read fresh every round)
        self.period = period
        self._states: dict[str, _TimelineState] = {}
        self._lock = threading.Lock()
        self._listing: dict[str, dict[str, int]] | None = None  # one listing at start-up, then kept in memory
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the background thread -------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="remote-sync", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Something changed (a layer was frozen, compacted, GC'd): upload soon. Cheap, any thread."""
        self._wake.set()

    def stop(self, final_round: bool = True, timeout: float = 5.0) -> None:
        """Stop the thread; with final_round, make one last round so a clean shutdown leaves the remote current."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if final_round:
            self.sync_all()

    def _run(self) -> None:
        last_commit = 0.0
        while not self._stopping:
            self._wake.wait(self.period)
            self._wake.clear()
            if self._stopping:
                return
            commit = time.monotonic() - last_commit >= COMMIT_PERIOD
            if commit:
                last_commit = time.monotonic()
            self.sync_all(commit_point=commit)

    def sync_all(self, commit_point: bool = True) -> None:
        for tl in list(self.timelines()):
            try:
                self.sync_timeline(tl, commit_point)
            except FileNotFoundError:
                pass  # compaction or GC removed a file of the snapshot: the next round sees the new index
            except Exception as e:  # noqa: BLE001 - logged, and retried next round
                self._log_error(tl.timeline_id, e)

    def _log_error(self, tid: str, e: Exception) -> None:
        st = self._state(tid)
        msg, now = str(e), time.monotonic()
        if st.last_error is None or st.last_error[0] != msg or now - st.last_error[1] > 60:
            st.last_error = (msg, now)
            log.error("timeline %s: upload to %s failed (retrying): %s", tid, self.storage.url, msg)

    # -- one round ---------------------------------------------------------------

    def _state(self, tid: str) -> _TimelineState:
        with self._lock:
            st = self._states.get(tid)
            if st is None:
                st = self._states[tid] = _TimelineState()
            return st

    def _remote_files(self, tid: str) -> dict[str, int]:
        with self._lock:
            if self._listing is None:
                self._listing = remote_timelines(self.storage)
            return self._listing.pop(tid, {})

    def sync_timeline(self, tl, commit_point: bool = True) -> int | None:
        """One round for one timeline; returns its remote_consistent_lsn (None if it is being deleted).

        Without ``commit_point`` only immutable files go up; the remote's commit point stays where it was.
        """
        st = self._state(tl.timeline_id)
        with st.lock:
            if st.deleted:
                return None
            if st.remote is None:
                st.remote = self._remote_files(tl.timeline_id)
            snap = take_snapshot(tl)
            prefix = timeline_prefix(tl.timeline_id)
            seg = snap.seg_size
            moved = [0, 0]  # files, bytes of immutable data uploaded (worth a log line)

            def put(key: str, source, size: int, length: int | None = None, immutable: bool = False) -> None:
                self.storage.upload(prefix + key, source, length)
                st.remote[key] = size
                if immutable:
                    moved[0] += 1
                    moved[1] += size

            # 1. immutable files: the index's layer files and full WAL segments
            for name, size in sorted(snap.layers.items()):
                if st.remote.get(f"layers/{name}") != size:
                    put(f"layers/{name}", tl.dir / "layers" / name, size, immutable=True)
            names = {s: segment_file_name(s, seg_size=seg) for s in snap.segments}
            for s in snap.segments:
                if (s + 1) * seg <= snap.last_record_lsn and st.remote.get(f"wal/{names[s]}") != seg:
                    put(f"wal/{names[s]}", tl.wal.path(s), seg, immutable=True)
            if not commit_point:
                return getattr(tl, "remote_consistent_lsn", None)
            # 2. the partial last segment (cut at last_record_lsn), metadata.json
            last, cut = divmod(snap.last_record_lsn, seg)
            if cut and last in names and st.remote.get(f"wal/{names[last]}") != cut:
                put(f"wal/{names[last]}", tl.wal.path(last), cut, length=cut)
            if snap.metadata != st.sent_metadata:
                put(METADATA_KEY, snap.metadata, len(snap.metadata))
                st.sent_metadata = snap.metadata
            # 3. the commit point
            if snap.index != st.sent_index:
                put(INDEX_KEY, snap.index, len(snap.index))
                st.sent_index = snap.index
            tl.remote_consistent_lsn = snap.last_record_lsn
            # 4. only now: what the new index and the local WAL no longer have
            segs = set(names.values())
            stale = [k for k in st.remote
                     if (k.startswith("layers/") and k != INDEX_KEY and k[len("layers/"):] not in snap.layers)
                     or (k.startswith("wal/") and k[len("wal/"):] not in segs)]
            if stale:
                self.storage.delete(prefix + k for k in stale)
                for k in stale:
                    st.remote.pop(k, None)
            if moved[0] or stale:
                log.info("timeline %s: uploaded %d file(s) (%d bytes), deleted %d; remote_consistent_lsn %s",
                         tl.timeline_id, moved[0], moved[1], len(stale), format_lsn(snap.last_record_lsn))
            st.last_error = None
            return snap.last_record_lsn

    # -- deletion ----------------------------------------------------------------

    def delete_timeline(self, tid: str) -> None:
        """Remove a timeline from the remote: its index first, so a half-deleted timeline is never restored."""
        st = self._state(tid)
        with st.lock:
            st.deleted = True
            try:
                delete_remote_timeline(self.storage, tid)
            except BaseException:
                st.deleted = False  # the timeline stays; keep offloading it
                raise
            with self._lock:
                if self._listing is not None:
                    self._listing.pop(tid, None)
