"""The safekeeper control file: a timeline's durable consensus state.

Next to its WAL segments every timeline directory on a safekeeper holds
``safekeeper.control``. It is what makes a vote binding: the acceptor writes
its new term here before it answers a vote request, so a restarted safekeeper
can never vote twice in one term. It also keeps the term history (see
``term_history``), where the timeline's WAL begins, and the LSNs the safekeeper
has learned: ``commit_lsn`` (on a quorum), ``backup_lsn`` (offloaded to remote
storage), ``peer_horizon_lsn`` (what peers may still need) and
``remote_consistent_lsn`` (durable on the pageserver).

``flush_lsn`` is only a hint: the file is rewritten lazily, not on every WAL
flush, so the real end of WAL is found by scanning WAL forward from it.

On disk (all integers little-endian)::

    offset  size  field
    0       4     magic  b"NCSK"
    4       2     format version (1)
    6       2     reserved, 0
    8       4     body length in bytes
    12      n     body: UTF-8 JSON object, keys sorted
    12+n    4     crc32c of bytes [0, 12+n)

The checksum covers the header as well as the body, so a flipped bit
anywhere is caught. ``save`` writes ``safekeeper.control.partial``, fsyncs
it, renames it over ``safekeeper.control`` and fsyncs the directory: a crash
leaves either the old or the new file, never a mix. ``load`` reads only the
final name, so a leftover ``.partial`` from a crash is ignored.
"""

from __future__ import annotations

import copy
import json
import os
import re
import struct
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import crc32c

from neonctl.engine.durability import fsync_dir
from neonctl.engine.lsn import WAL_SEGMENT_SIZE
from neonctl.engine.safekeeper.term_history import (
    ProtocolViolation,
    TermHistory,
    TermSwitch,
)
from neonctl.errors import CorruptData, InvalidInput, NotFound

CONTROL_FILE_NAME = "safekeeper.control"
MAGIC = b"NCSK"
FORMAT_VERSION = 1

_HEADER = struct.Struct("<4sHHI")
_CRC = struct.Struct("<I")
_TIMELINE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_COMPUTE_KEYS = frozenset({"host", "port", "user", "app_name"})


@dataclass(kw_only=True)
class TimelineState:
    """Everything a safekeeper must remember about one timeline across restarts."""

    timeline_id: str
    system_id: int
    pg_version: int
    wal_seg_size: int = WAL_SEGMENT_SIZE
    term: int = 0  # the highest term this safekeeper voted for or accepted
    term_history: list[TermSwitch] = field(default_factory=list)
    timeline_start_lsn: int
    flush_lsn: int  # lazily persisted; the real WAL end may be higher
    commit_lsn: int
    backup_lsn: int = 0
    peer_horizon_lsn: int = 0
    remote_consistent_lsn: int = 0
    compute: dict[str, Any] | None = None  # {"host", "port", "user", "app_name"}

    def __post_init__(self) -> None:
        if not isinstance(self.timeline_id, str) or not _TIMELINE_ID_RE.match(self.timeline_id):
            raise InvalidInput(f"invalid timeline id {self.timeline_id!r}: expected 32 lowercase hex digits")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise InvalidInput(
                    f"timeline {self.timeline_id}: {f.name} must be a non-negative integer, got {value!r}"
                )
        if self.wal_seg_size <= 0 or self.wal_seg_size & (self.wal_seg_size - 1):
            raise InvalidInput(f"timeline {self.timeline_id}: wal_seg_size {self.wal_seg_size} is not a power of two")
        try:
            self.term_history = TermHistory(self.term_history).to_list()
        except (ProtocolViolation, TypeError, ValueError) as e:
            raise InvalidInput(f"timeline {self.timeline_id}: bad term history: {e}") from None
        if self.term_history and self.term_history[-1].term > self.term:
            raise InvalidInput(
                f"timeline {self.timeline_id}: term history reaches term {self.term_history[-1].term} "
                f"above the current term {self.term}"
            )
        if self.compute is not None and (not isinstance(self.compute, dict) or not set(self.compute) <= _COMPUTE_KEYS):
            raise InvalidInput(f"timeline {self.timeline_id}: compute must be a dict with keys {sorted(_COMPUTE_KEYS)}")

    def copy(self) -> TimelineState:
        """An independent copy (the lists and dict inside are copied too)."""
        new = copy.copy(self)
        new.term_history = list(self.term_history)
        new.compute = dict(self.compute) if self.compute is not None else None
        return new


def last_log_term(state: TimelineState, flush_lsn: int | None = None) -> int:
    """The term of the last WAL byte held: the last switch at or below the flush LSN.

    Pass the real WAL end as ``flush_lsn`` when known; ``state.flush_lsn``
    may lag it, and then this can answer an older term.
    """
    end = state.flush_lsn if flush_lsn is None else flush_lsn
    return TermHistory(state.term_history).up_to(end).last_term


def control_file_path(path: str | os.PathLike[str]) -> Path:
    """``path`` itself, or ``path/safekeeper.control`` when ``path`` is a directory."""
    p = Path(path)
    return p / CONTROL_FILE_NAME if p.is_dir() else p


def encode(state: TimelineState) -> bytes:
    """Serialize ``state`` to the on-disk format (header, JSON body, crc32c)."""
    body = json.dumps(_to_json(state), sort_keys=True, separators=(",", ":")).encode()
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(body)) + body
    return head + _CRC.pack(crc32c.crc32c(head))


def decode(data: bytes, path: str | os.PathLike[str] = "<memory>") -> TimelineState:
    """Parse the on-disk format; any damage raises CorruptData naming ``path``."""
    if len(data) < _HEADER.size:
        raise CorruptData(f"control file {path} is truncated: {len(data)} bytes, shorter than its header")
    magic, version, _reserved, body_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptData(f"control file {path} has bad magic {magic!r}, expected {MAGIC!r}")
    expected = _HEADER.size + body_len + _CRC.size
    if len(data) < expected:
        raise CorruptData(f"control file {path} is truncated: {len(data)} of {expected} bytes")
    if len(data) > expected:
        raise CorruptData(f"control file {path} has {len(data) - expected} unexpected trailing bytes")
    (stored_crc,) = _CRC.unpack_from(data, expected - _CRC.size)
    actual_crc = crc32c.crc32c(data[: expected - _CRC.size])
    if stored_crc != actual_crc:
        raise CorruptData(
            f"control file {path} failed its checksum (stored {stored_crc:08x}, computed {actual_crc:08x})"
        )
    if version != FORMAT_VERSION:
        raise CorruptData(f"control file {path} has format version {version}; this neonctl reads {FORMAT_VERSION}")
    body = data[_HEADER.size : _HEADER.size + body_len]
    try:
        return _from_json(json.loads(body))
    except (ValueError, TypeError, KeyError, AttributeError, InvalidInput) as e:
        raise CorruptData(f"control file {path} has an invalid body: {e}") from None


def save(path: str | os.PathLike[str], state: TimelineState) -> None:
    """Durably replace the control file: write ``.partial``, fsync, rename, fsync the directory."""
    final = control_file_path(path)
    partial = final.with_name(final.name + ".partial")
    data = encode(state)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, final)
    fsync_dir(final.parent)


def load(path: str | os.PathLike[str]) -> TimelineState:
    """Read and verify the control file (a ``.partial`` next to it is ignored)."""
    final = control_file_path(path)
    try:
        data = final.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"no safekeeper control file at {final}") from None
    return decode(data, final)


def _to_json(state: TimelineState) -> dict[str, Any]:
    out: dict[str, Any] = {f.name: getattr(state, f.name) for f in fields(state)}
    out["term_history"] = [[e.term, e.start_lsn] for e in state.term_history]
    return out


def _from_json(obj: Any) -> TimelineState:
    if not isinstance(obj, dict):
        raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
    known = {f.name for f in fields(TimelineState)}
    unknown = set(obj) - known
    if unknown:
        raise KeyError(f"unknown fields {sorted(unknown)}")
    history = obj.get("term_history", [])
    if not isinstance(history, list) or not all(
        isinstance(e, list) and len(e) == 2 and all(isinstance(x, int) for x in e) for e in history
    ):
        raise TypeError("term_history must be a list of [term, lsn] pairs")
    kwargs = dict(obj)
    kwargs["term_history"] = [TermSwitch(t, lsn) for t, lsn in history]
    missing = {
        f.name
        for f in fields(TimelineState)
        if f.name not in kwargs and f.default is MISSING and f.default_factory is MISSING
    }
    if missing:
        raise KeyError(f"missing fields {sorted(missing)}")
    return TimelineState(**kwargs)
