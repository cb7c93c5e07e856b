"""A safekeeper's copy of one timeline: its WAL segments, its acceptor and its durable control state.

Four positions describe the WAL held, lowest first when the compute is idle:

- ``flush_lsn``: the end of the last complete record that is fdatasync'ed. This is the
  safekeeper's "flush LSN" in the consensus protocol: what it votes with, publishes to the
  broker and counts for ``commit_lsn``. It is always a record boundary, so a new term never
  starts in the middle of a record and ``commit_lsn`` (a quorum's flush LSN) is one too.
- ``record_lsn``: the end of the last complete record written (maybe not yet durable).
- ``synced_lsn``: bytes fdatasync'ed; the compute is told write = flush = apply = this, so a
  commit acknowledged to a client is on disk here (its commit record ends at or below it).
- ``write_lsn``: bytes written.

The consensus state (term, term history, commit_lsn) belongs to the ``Acceptor``; this class
is its storage (persist, truncate, flush LSN) and adds what the acceptor does not model: the
attached compute, what the pageserver has persisted (``remote_consistent_lsn``) and where the
WAL on disk begins after trimming.

The control file is written when the acceptor changes consensus state (a vote is durable
before it is answered) and otherwise lazily; its ``flush_lsn`` is a record boundary that was
durable when written. At start-up the WAL is verified (CRC, page headers, prev-links) from the
start of the segment holding that hint (or commit_lsn, if lower) to its real end. Valid WAL
that stops *below* the hint means bytes we once fsynced are gone or damaged (a torn or
overwritten segment): the timeline is then refused (``CorruptData``) until it is repaired
from peers (or, for a lone safekeeper, at the pageserver's WAL end: ``pageserver_repair``). A control
file that fails its checksum is refused the same way.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from neonctl.engine.lsn import format_lsn
from neonctl.engine.safekeeper.acceptor import Acceptor
from neonctl.engine.safekeeper.control_file import TimelineState, load, save
from neonctl.engine.safekeeper.term_history import TermHistory
from neonctl.engine.wal.reader import WalDecodeError, WalStreamDecoder, find_end_of_wal
from neonctl.engine.wal.segments import SegmentedWal
from neonctl.errors import CorruptData, InvalidInput

CONTROL_FILE = "safekeeper.control"


class _AcceptorStorage:
    """The acceptor's view of disk: the control file, WAL truncation and the durable record end."""

    def __init__(self, tl: SkTimeline):
        self.tl = tl

    def persist(self, state: TimelineState) -> None:
        self.tl.write(self.tl._merge(state))

    def truncate_wal(self, lsn: int) -> None:
        self.tl.truncate(lsn)

    def flush_lsn(self) -> int:
        return self.tl.flush_lsn


class SkTimeline:
    def __init__(self, directory: Path, state: TimelineState):
        self.dir = directory
        self.timeline_id = state.timeline_id
        self.system_id = state.system_id
        self.pg_version = state.pg_version
        self.seg_size = state.wal_seg_size
        self.wal = SegmentedWal(directory / "wal", state.wal_seg_size)
        self.compute = state.compute
        self.remote_consistent_lsn = state.remote_consistent_lsn
        self.backup_lsn = state.backup_lsn
        self.corrupt: str | None = None
        self.streaming = False
        self.last_error: str | None = None
        self.io_lock = threading.Lock()  # WAL file I/O: a truncation waits for an fdatasync in flight
        self.append_lock = asyncio.Lock()  # one WAL writer at a time: the compute stream or peer recovery
        self._flushed = asyncio.Event()
        self._committed = asyncio.Event()
        self._save_lock = threading.Lock()
        self._seq = 0  # control-file snapshots are numbered; an older one never overwrites a newer
        self._saved_seq = 0
        end = self._scan(state)
        self.write_lsn = self.synced_lsn = self.record_lsn = self.flush_lsn = end
        self._decoder = WalStreamDecoder(end, self.seg_size)
        self.acceptor = Acceptor(state, _AcceptorStorage(self))

    def _scan(self, state: TimelineState) -> int:
        """The real end of valid WAL; CorruptData if it lies below what the control file says was durable."""
        segs = self.wal.segments()
        seg = self.seg_size
        hint = max(state.flush_lsn, state.timeline_start_lsn)
        self.wal_start_lsn = max(state.timeline_start_lsn, segs[0] * seg) if segs else state.timeline_start_lsn
        if not segs:
            if hint > state.timeline_start_lsn:
                raise CorruptData(f"timeline {state.timeline_id}: the control file says WAL was flushed to "
                                  f"{format_lsn(hint)} but there are no WAL segments")
            return hint
        upper = (segs[-1] + 1) * seg
        anchor = min(state.commit_lsn, hint)
        scan_from = max(self.wal_start_lsn, anchor - anchor % seg)  # verify from the start of its segment
        end = find_end_of_wal(self.wal.read, scan_from, upper, seg)
        if end < hint:
            raise CorruptData(
                f"timeline {state.timeline_id}: WAL is damaged at {format_lsn(end)} (segment "
                f"{self.wal.path(end // seg).name}): the control file says it was flushed to {format_lsn(hint)}")
        return end

    @classmethod
    def create(cls, directory: Path, state: TimelineState) -> SkTimeline:
        directory.mkdir(parents=True, exist_ok=True)
        save(directory / CONTROL_FILE, state)
        return cls(directory, state)

    @classmethod
    def open(cls, directory: Path) -> SkTimeline:
        return cls(directory, load(directory / CONTROL_FILE))

    # -- consensus state -----------------------------------------------------

    @property
    def term(self) -> int:
        return self.acceptor.term

    @property
    def commit_lsn(self) -> int:
        return self.acceptor.commit_lsn

    @property
    def timeline_start_lsn(self) -> int:
        return self.acceptor.state.timeline_start_lsn

    def term_history(self) -> TermHistory:
        """The adopted history (may run ahead of the WAL held)."""
        return self.acceptor.adopted_term_history()

    @property
    def last_log_term(self) -> int:
        return self.acceptor.last_log_term()

    @property
    def term_start_lsn(self) -> int:
        h = self.term_history()
        return h[-1].start_lsn if h else self.timeline_start_lsn

    @property
    def in_term(self) -> bool:
        """ProposerElected (or a peer's equivalent) of the current term has been accepted."""
        h = self.term_history()
        return bool(h) and h.last_term == self.term

    def update_commit(self, lsn: int, peer_last_log_term: int | None = None) -> None:
        before = self.acceptor.commit_lsn
        if self.acceptor.update_commit_lsn(lsn, peer_last_log_term=peer_last_log_term) > before:
            self._committed.set()
            self._committed = asyncio.Event()

    # -- control file --------------------------------------------------------

    def _merge(self, state: TimelineState) -> tuple[int, TimelineState]:
        """Number a copy of ``state`` with our own fields filled in (call on the event loop)."""
        st = state.copy()
        st.compute = dict(self.compute) if self.compute else None
        st.remote_consistent_lsn = self.remote_consistent_lsn
        st.backup_lsn = self.backup_lsn
        st.flush_lsn = self.flush_lsn
        self._seq += 1
        return self._seq, st

    def snapshot(self) -> tuple[int, TimelineState]:
        """The state to persist now (call on the event loop; ``write`` it from any thread)."""
        return self._merge(self.acceptor.state)

    def write(self, snap: tuple[int, TimelineState]) -> None:
        """Durably write a snapshot unless a newer one is already on disk."""
        seq, st = snap
        with self._save_lock:
            if seq <= self._saved_seq:
                return
            save(self.dir / CONTROL_FILE, st)
            self._saved_seq = seq

    def persist(self) -> None:
        self.write(self.snapshot())

    # -- WAL -------------------------------------------------------------------

    def append(self, lsn: int, data: bytes) -> None:
        """Write (not yet durable) WAL at the write position."""
        if lsn != self.write_lsn:
            raise InvalidInput(f"WAL gap: expected {format_lsn(self.write_lsn)}, got {format_lsn(lsn)}")
        self.wal.write(lsn, data)
        self.write_lsn = lsn + len(data)
        self._decoder.feed(data)
        try:
            while (rec := self._decoder.poll()) is not None:
                self.record_lsn = rec.end_lsn
        except WalDecodeError as e:
            self.last_error = f"invalid WAL: {e}"
            raise

    def sync(self) -> None:
        """fdatasync what was appended (runs in a worker thread)."""
        with self.io_lock:
            self.wal.flush()

    def mark_synced(self, write_lsn: int, record_lsn: int) -> None:
        """The bytes up to write_lsn (records up to record_lsn) are durable."""
        self.synced_lsn = max(self.synced_lsn, write_lsn)
        if record_lsn > self.flush_lsn:
            self.flush_lsn = record_lsn
            self._flushed.set()
            self._flushed = asyncio.Event()

    def normalize(self) -> None:
        """Make everything written durable and cut a partial record at the end (no writer may be active).

        Run before a vote: the flush LSN we vote with is then exactly where our WAL ends.
        """
        with self.io_lock:
            self.wal.flush()
        self.mark_synced(self.write_lsn, self.record_lsn)
        if self.write_lsn > self.record_lsn:
            self.truncate(self.record_lsn)

    def truncate(self, lsn: int) -> None:
        """Durably cut WAL so it ends at lsn (zeroing the rest of its segment); empty WAL begins there."""
        was_empty = self.write_lsn <= self.wal_start_lsn
        if lsn < self.flush_lsn:
            # Lower the control file's flush hint first: a crash between the two must not look
            # like WAL that was fsynced and then lost (which start-up reports as corruption).
            self.flush_lsn = lsn
            self.persist()
        with self.io_lock:
            self.wal.truncate(lsn)
        self.write_lsn = self.synced_lsn = self.record_lsn = self.flush_lsn = lsn
        if was_empty or lsn < self.wal_start_lsn:
            self.wal_start_lsn = lsn
        self._decoder = WalStreamDecoder(lsn, self.seg_size)

    def read(self, start: int, end: int) -> bytes:
        if start < self.wal_start_lsn:
            raise InvalidInput(f"WAL before {format_lsn(self.wal_start_lsn)} is not on this safekeeper")
        return self.wal.read(start, end - start) if end > start else b""

    def remove_segments_below(self, lsn: int) -> int:
        """Delete whole segments that end at or below lsn; returns how many."""
        removed = 0
        with self.io_lock:
            for s in self.wal.segments():
                if (s + 1) * self.seg_size > lsn or (s + 1) * self.seg_size > self.flush_lsn:
                    break
                fd = self.wal._fds.pop(s, None)
                if fd is not None:
                    os.close(fd)
                self.wal._dirty.discard(s)
                self.wal.path(s).unlink()
                self.wal._dir_dirty = True
                self.wal_start_lsn = max(self.wal_start_lsn, (s + 1) * self.seg_size)
                removed += 1
        return removed

    async def wait_flushed(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._flushed.wait(), timeout)
        except TimeoutError:
            pass

    async def wait_committed(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._committed.wait(), timeout)
        except TimeoutError:
            pass

    def close(self) -> None:
        with self.io_lock:
            self.wal.close()

    def info(self) -> dict:
        st = self.acceptor.state
        return {
            "timeline_id": self.timeline_id, "term": st.term, "last_log_term": self.last_log_term,
            "term_history": [[e.term, e.start_lsn] for e in st.term_history],
            "flush_lsn": self.flush_lsn, "commit_lsn": st.commit_lsn, "synced_lsn": self.synced_lsn,
            "record_lsn": self.record_lsn, "write_lsn": self.write_lsn,
            "timeline_start_lsn": st.timeline_start_lsn, "wal_start_lsn": self.wal_start_lsn,
            "backup_lsn": self.backup_lsn, "remote_consistent_lsn": self.remote_consistent_lsn,
            "system_id": self.system_id, "pg_version": self.pg_version, "compute": self.compute,
            "streaming": self.streaming, "last_error": self.last_error, "corrupt": None,
        }


def repair_hint(sk_id: int, single: bool) -> str:
    """What `neonctl safekeeper repair` does for a damaged timeline of this safekeeper."""
    if single:
        return (f"run `neonctl safekeeper repair {sk_id}`: with no peer to copy from, it stops the branch's "
                "compute and rebuilds the timeline at the end of the WAL the pageserver holds; WAL only this "
                "safekeeper had beyond that is lost, and the repair says exactly how much")
    return f"run `neonctl safekeeper repair {sk_id}`: it rebuilds the timeline from its peers"


class BrokenTimeline:
    """A timeline whose control file or WAL failed verification: it serves nothing until repaired."""

    corrupt: str

    def __init__(self, directory: Path, timeline_id: str, error: str, state: TimelineState | None):
        self.dir = directory
        self.timeline_id = timeline_id
        self.corrupt = error
        self.state = state  # the control file, when it was readable (the WAL was the damaged part)
        self.streaming = False

    def close(self) -> None:
        pass

    def info(self) -> dict:
        s = self.state
        return {"timeline_id": self.timeline_id, "corrupt": self.corrupt, "term": s.term if s else None,
                "last_log_term": None, "term_history": [[e.term, e.start_lsn] for e in s.term_history] if s else [],
                "flush_lsn": None, "commit_lsn": s.commit_lsn if s else None, "streaming": False,
                "system_id": s.system_id if s else None, "pg_version": s.pg_version if s else None,
                "timeline_start_lsn": s.timeline_start_lsn if s else None, "compute": None,
                "last_error": self.corrupt}


def open_timeline(directory: Path) -> SkTimeline | BrokenTimeline:
    """Open a timeline directory; damage gives a BrokenTimeline instead of an exception."""
    try:
        state = load(directory / CONTROL_FILE)
    except CorruptData as e:
        return BrokenTimeline(directory, directory.name, str(e), None)
    try:
        return SkTimeline(directory, state)
    except CorruptData as e:
        return BrokenTimeline(directory, state.timeline_id, str(e), state)
