"""A safekeeper's copy of one timeline: its WAL segments and durable control state.

The WAL end that matters is `flush_lsn`: the bytes up to it are fdatasync'ed,
and only then is the compute told they are flushed, so a commit acknowledged
to a client is on disk here. The control file is written lazily and holds a
record boundary at or below the flush point; at start-up the true end of WAL
is found by scanning valid records forward from it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from neonctl.engine.safekeeper.control_file import TimelineState, load, save
from neonctl.engine.wal.reader import WalDecodeError, WalStreamDecoder, find_end_of_wal
from neonctl.engine.wal.segments import SegmentedWal
from neonctl.errors import InvalidInput

CONTROL_FILE = "safekeeper.control"


class SkTimeline:
    def __init__(self, directory: Path, state: TimelineState):
        self.dir = directory
        self.state = state
        self.wal = SegmentedWal(directory / "wal", state.wal_seg_size)
        segs = self.wal.segments()
        upper = (segs[-1] + 1) * state.wal_seg_size if segs else state.flush_lsn
        start = max(state.flush_lsn, state.timeline_start_lsn)
        self.flush_lsn = find_end_of_wal(self.wal.read, start, upper) if segs else start
        self.write_lsn = self.flush_lsn
        self.record_lsn = self.flush_lsn  # end of the last complete record received
        self._decoder = WalStreamDecoder(self.flush_lsn, state.wal_seg_size)
        self.changed = asyncio.Event()
        self.streaming = False
        self.last_error: str | None = None

    @classmethod
    def create(cls, directory: Path, state: TimelineState) -> "SkTimeline":
        directory.mkdir(parents=True, exist_ok=True)
        save(directory / CONTROL_FILE, state)
        return cls(directory, state)

    @classmethod
    def open(cls, directory: Path) -> "SkTimeline":
        return cls(directory, load(directory / CONTROL_FILE))

    @property
    def commit_lsn(self) -> int:
        return self.flush_lsn  # a single safekeeper is its own quorum

    def persist(self) -> None:
        self.state.flush_lsn = self.record_lsn
        self.state.commit_lsn = max(self.state.commit_lsn, min(self.record_lsn, self.commit_lsn))
        save(self.dir / CONTROL_FILE, self.state)

    def reset_to(self, lsn: int) -> None:
        """Start accepting WAL at lsn from a new compute; drop anything we hold past it."""
        if lsn > self.flush_lsn:
            raise InvalidInput(f"cannot start at {lsn:X}: WAL ends at {self.flush_lsn:X}")
        if lsn < self.state.commit_lsn and lsn < self.record_lsn:
            raise InvalidInput("refusing to truncate committed WAL")
        if lsn < self.flush_lsn:
            self.wal.truncate(lsn)
        self.flush_lsn = self.write_lsn = self.record_lsn = lsn
        self._decoder = WalStreamDecoder(lsn, self.state.wal_seg_size)
        self.persist()

    def append(self, lsn: int, data: bytes) -> None:
        """Write (not yet durable) WAL received from the compute."""
        if lsn != self.write_lsn:
            raise InvalidInput(f"WAL gap: expected {self.write_lsn:X}, got {lsn:X}")
        self.wal.write(lsn, data)
        self.write_lsn = lsn + len(data)
        self._decoder.feed(data)
        try:
            while (rec := self._decoder.poll()) is not None:
                self.record_lsn = rec.end_lsn
        except WalDecodeError as e:
            self.last_error = f"invalid WAL from compute: {e}"
            raise

    def sync(self) -> None:
        """fdatasync what was appended (runs in a worker thread)."""
        self.wal.flush()

    def mark_flushed(self, lsn: int) -> None:
        if lsn > self.flush_lsn:
            self.flush_lsn = lsn
            self.changed.set()
            self.changed = asyncio.Event()

    def info(self) -> dict:
        s = self.state
        return {
            "timeline_id": s.timeline_id, "term": s.term, "flush_lsn": self.flush_lsn,
            "commit_lsn": self.commit_lsn, "record_lsn": self.record_lsn,
            "timeline_start_lsn": s.timeline_start_lsn, "system_id": s.system_id,
            "pg_version": s.pg_version, "compute": s.compute, "streaming": self.streaming,
            "last_error": self.last_error,
        }
