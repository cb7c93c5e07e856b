"""Commit records as (commit end LSN, commit time) pairs: the index that turns a time into an LSN.

Ingest appends the pairs of every batch to ``commits.bin``; a timeline downloaded from remote storage
rebuilds the file by scanning its WAL, so the reader and the scanner live here, below both.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from neonctl.engine.wal.decoder import (
    RM_XACT_ID,
    RM_XLOG_ID,
    XLOG_CHECKPOINT_ONLINE,
    XLOG_CHECKPOINT_SHUTDOWN,
    XLOG_XACT_COMMIT,
    XLOG_XACT_COMMIT_PREPARED,
    XLOG_XACT_OPMASK,
)
from neonctl.engine.wal.record_scan import RecordBatch


def commits_of(batch: RecordBatch) -> np.ndarray:
    """(commit end LSN, xact_time) rows of the batch's commit records; xact_time opens their main data."""
    op = batch.info & XLOG_XACT_OPMASK
    idx = np.flatnonzero((batch.rmid == RM_XACT_ID) & ((op == XLOG_XACT_COMMIT) | (op == XLOG_XACT_COMMIT_PREPARED))
                         & (batch.main_len >= 8))
    times = batch.data[batch.main_off[idx, None] + np.arange(8)].view("<i8").ravel()  # one gather of 8 bytes each
    return np.stack([batch.end[idx].astype(np.int64), times], axis=1)


def last_checkpoint_of(batch: RecordBatch) -> int | None:
    """Start LSN of the batch's last checkpoint record (shutdown or online), if any."""
    kind = batch.info & 0xF0
    idx = np.flatnonzero((batch.rmid == RM_XLOG_ID)
                         & ((kind == XLOG_CHECKPOINT_SHUTDOWN) | (kind == XLOG_CHECKPOINT_ONLINE)))
    return int(batch.lsn[idx[-1]]) if len(idx) else None


class CommitLog:
    """Append-only (commit end LSN, commit timestamp) pairs from commit records: time -> LSN lookups."""

    _REC = struct.Struct("<Qq")

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None  # kept open: ingest appends a commit or two per message

    def append(self, commits: list[tuple[int, int]] | np.ndarray) -> None:
        """Append pairs (a list, or an (n, 2) int64 array as ingest makes them)."""
        if len(commits):
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(self._fd, np.asarray(commits, dtype="<i8").reshape(-1, 2).tobytes())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def entries(self, upto_lsn: int | None = None) -> list[tuple[int, int]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        n = len(data) // self._REC.size  # a torn last entry (crash mid-append) is ignored
        out = [self._REC.unpack_from(data, i * self._REC.size) for i in range(n)]
        return [e for e in out if upto_lsn is None or e[0] <= upto_lsn]
