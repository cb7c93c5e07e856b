"""The main data of the records neonctl acts on, parsed per resource manager.

``decoder.py`` splits any record into block references and main data; what the main data
means depends on the resource manager, and only a few records matter to the pageserver and
the safekeeper: transaction end (commit/abort, two-phase forms), checkpoint and next-OID,
relation create/truncate, database create/drop and relmap update. Each ``parse_*`` returns
None for records it is not about, so callers can try them in turn. Layouts are those of
PostgreSQL 15-18; where they differ the helpers take the major version.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from neonctl.engine.timepoint import PG_EPOCH
from neonctl.engine.wal.decoder import (
    LATEST_PG_VERSION,
    RM_DBASE_ID,
    RM_RELMAP_ID,
    RM_SMGR_ID,
    RM_XACT_ID,
    RM_XLOG_ID,
    XLOG_CHECKPOINT_ONLINE,
    XLOG_CHECKPOINT_SHUTDOWN,
    XLOG_DBASE_CREATE_FILE_COPY,
    XLOG_DBASE_CREATE_WAL_LOG,
    XLOG_DBASE_DROP,
    XLOG_NEXTOID,
    XLOG_RELMAP_UPDATE,
    XLOG_SMGR_CREATE,
    XLOG_SMGR_TRUNCATE,
    XLOG_XACT_ABORT,
    XLOG_XACT_ABORT_PREPARED,
    XLOG_XACT_COMMIT,
    XLOG_XACT_COMMIT_PREPARED,
    XLOG_XACT_HAS_INFO,
    XLOG_XACT_OPMASK,
    DecodedRecord,
    invalid_record,
)
from neonctl.engine.wal.reader import WalDecodeError

# xl_xact_xinfo flags (xact.h): which optional parts follow a commit/abort record's header
XACT_XINFO_HAS_DBINFO = 1 << 0
XACT_XINFO_HAS_SUBXACTS = 1 << 1
XACT_XINFO_HAS_RELFILELOCATORS = 1 << 2
XACT_XINFO_HAS_INVALS = 1 << 3
XACT_XINFO_HAS_TWOPHASE = 1 << 4
XACT_XINFO_HAS_ORIGIN = 1 << 5
XACT_XINFO_HAS_AE_LOCKS = 1 << 6
XACT_XINFO_HAS_GID = 1 << 7
XACT_XINFO_HAS_DROPPED_STATS = 1 << 8
# xl_smgr_truncate.flags (storage_xlog.h): which forks a truncation applies to
SMGR_TRUNCATE_HEAP, SMGR_TRUNCATE_VM, SMGR_TRUNCATE_FSM = 0x1, 0x2, 0x4

_U32 = struct.Struct("<I")
_RLOC = struct.Struct("<III")


def timestamptz_to_datetime(ts: int) -> datetime:
    """PostgreSQL TimestampTz (microseconds since 2000-01-01 UTC) as an aware datetime."""
    try:
        return PG_EPOCH + timedelta(microseconds=ts)
    except OverflowError:
        return datetime.max.replace(tzinfo=UTC) if ts > 0 else datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True)
class RelFileLocator:
    spc: int
    db: int
    rel: int


@dataclass
class XactRecord:
    """A transaction's end (commit, abort, and their two-phase forms) or its prepare."""

    kind: str  # "commit" | "abort" | "commit_prepared" | "abort_prepared"
    xid: int  # the transaction it ends: the record's xid, or the prepared xid for *_prepared
    xact_time: int  # TimestampTz
    xinfo: int = 0
    db_id: int | None = None
    ts_id: int | None = None
    subxacts: list[int] = field(default_factory=list)
    rels: list[RelFileLocator] = field(default_factory=list)  # relations dropped by this commit/abort
    ndropped_stats: int = 0
    ninvals: int = 0
    twophase_xid: int | None = None
    gid: str | None = None
    origin_lsn: int | None = None
    origin_timestamp: int | None = None

    @property
    def timestamp(self) -> datetime:
        return timestamptz_to_datetime(self.xact_time)

    @property
    def is_commit(self) -> bool:
        return self.kind in ("commit", "commit_prepared")


_XACT_KINDS = {XLOG_XACT_COMMIT: "commit", XLOG_XACT_ABORT: "abort",
               XLOG_XACT_COMMIT_PREPARED: "commit_prepared", XLOG_XACT_ABORT_PREPARED: "abort_prepared"}


def parse_xact(rec: DecodedRecord, pg_version: int | None = None, strict: bool = False) -> XactRecord | None:
    """Commit/abort (incl. prepared) details; None for other Transaction records (prepare, assignment, ...).

    ``strict``: also fail if bytes are left over (a layout mismatch, e.g. the wrong pg_version).
    """
    if rec.rmid != RM_XACT_ID:
        return None
    op = rec.info & XLOG_XACT_OPMASK
    kind = _XACT_KINDS.get(op)
    if kind is None:
        return None
    d = rec.main_data
    try:
        (xact_time,) = struct.unpack_from("<q", d, 0)
        x = XactRecord(kind, rec.xid, xact_time)
        off = 8
        if rec.info & XLOG_XACT_HAS_INFO:
            x.xinfo = xinfo = _U32.unpack_from(d, off)[0]
            off += 4
        else:
            xinfo = 0
        if xinfo & XACT_XINFO_HAS_DBINFO:
            x.db_id, x.ts_id = struct.unpack_from("<II", d, off)
            off += 8
        if xinfo & XACT_XINFO_HAS_SUBXACTS:
            (cnt,) = struct.unpack_from("<i", d, off)
            x.subxacts = list(struct.unpack_from(f"<{cnt}I", d, off + 4))
            off += 4 + 4 * cnt
        if xinfo & XACT_XINFO_HAS_RELFILELOCATORS:
            (cnt,) = struct.unpack_from("<i", d, off)
            off += 4
            for _ in range(cnt):
                x.rels.append(RelFileLocator(*_RLOC.unpack_from(d, off)))
                off += 12
        if xinfo & XACT_XINFO_HAS_DROPPED_STATS:
            (cnt,) = struct.unpack_from("<i", d, off)
            x.ndropped_stats = cnt
            off += 4 + cnt * _stats_item_size(rec, pg_version)
        if xinfo & XACT_XINFO_HAS_INVALS and op != XLOG_XACT_ABORT and op != XLOG_XACT_ABORT_PREPARED:
            (cnt,) = struct.unpack_from("<i", d, off)
            x.ninvals = cnt
            off += 4 + 16 * cnt  # sizeof(SharedInvalidationMessage)
        if xinfo & XACT_XINFO_HAS_TWOPHASE:
            x.twophase_xid = _U32.unpack_from(d, off)[0]
            off += 4
            if xinfo & XACT_XINFO_HAS_GID:
                nul = d.find(b"\0", off)
                if nul < 0:
                    raise struct.error("unterminated gid")
                x.gid = d[off:nul].decode("utf-8", "replace")
                off = nul + 1
        if xinfo & XACT_XINFO_HAS_ORIGIN:
            x.origin_lsn, x.origin_timestamp = struct.unpack_from("<Qq", d, off)
            off += 16
    except struct.error:
        raise invalid_record(rec.lsn, f"truncated {kind} record") from None
    if strict and off != len(d):
        raise invalid_record(rec.lsn, f"{len(d) - off} bytes left over in {kind} record")
    if kind.endswith("_prepared"):
        if x.twophase_xid is None:
            raise invalid_record(rec.lsn, f"{kind} record without a prepared xid")
        x.xid = x.twophase_xid
    return x


def _stats_item_size(rec: DecodedRecord, pg_version: int | None) -> int:
    version = pg_version or rec.pg_version
    if version is None:
        raise ValueError("the PostgreSQL version is needed to parse dropped-stats items: pass pg_version")
    return 16 if version >= 18 else 12  # PG 18 widened xl_xact_stats_item.objoid to 64 bits


@dataclass
class CheckPoint:
    """The CheckPoint struct (pg_control.h) carried by checkpoint records."""

    redo: int
    this_timeline: int
    prev_timeline: int
    full_page_writes: bool
    wal_level: int | None  # in the struct from PostgreSQL 17 on
    next_xid: int  # FullTransactionId: epoch << 32 | xid
    next_oid: int
    next_multi: int
    next_multi_offset: int
    oldest_xid: int
    oldest_xid_db: int
    oldest_multi: int
    oldest_multi_db: int
    time: int  # pg_time_t, seconds since 1970
    oldest_commit_ts_xid: int
    newest_commit_ts_xid: int
    oldest_active_xid: int
    shutdown: bool = False

    @property
    def next_xid_epoch(self) -> int:
        return self.next_xid >> 32

    @property
    def timestamp(self) -> datetime:
        return datetime.fromtimestamp(self.time, UTC)


_CHECKPOINT = struct.Struct("<QII?3xiQIIIIIII4xqIII4x")  # 88 bytes in PostgreSQL 15-18
CHECKPOINT_SIZE = _CHECKPOINT.size


def parse_checkpoint_bytes(d: bytes, pg_version: int | None) -> CheckPoint:
    if len(d) < CHECKPOINT_SIZE:
        raise WalDecodeError(f"checkpoint data of {len(d)} bytes, expected {CHECKPOINT_SIZE}")
    f = _CHECKPOINT.unpack_from(d)
    wal_level = f[4] if (pg_version or LATEST_PG_VERSION) >= 17 else None
    return CheckPoint(f[0], f[1], f[2], f[3], wal_level, *f[5:])


def parse_checkpoint(rec: DecodedRecord, pg_version: int | None = None) -> CheckPoint | None:
    """The checkpoint of a CHECKPOINT_SHUTDOWN/ONLINE record, else None."""
    if rec.rmid != RM_XLOG_ID or rec.rmgr_info not in (XLOG_CHECKPOINT_SHUTDOWN, XLOG_CHECKPOINT_ONLINE):
        return None
    cp = parse_checkpoint_bytes(rec.main_data, pg_version or rec.pg_version)
    cp.shutdown = rec.rmgr_info == XLOG_CHECKPOINT_SHUTDOWN
    return cp


def parse_nextoid(rec: DecodedRecord) -> int | None:
    if rec.rmid != RM_XLOG_ID or rec.rmgr_info != XLOG_NEXTOID:
        return None
    return _U32.unpack_from(rec.main_data)[0]


@dataclass
class SmgrCreate:
    rel: RelFileLocator
    forknum: int


@dataclass
class SmgrTruncate:
    rel: RelFileLocator
    blkno: int  # new length in blocks
    flags: int  # SMGR_TRUNCATE_HEAP | _VM | _FSM: which forks

    truncates_heap = property(lambda self: bool(self.flags & SMGR_TRUNCATE_HEAP))
    truncates_vm = property(lambda self: bool(self.flags & SMGR_TRUNCATE_VM))
    truncates_fsm = property(lambda self: bool(self.flags & SMGR_TRUNCATE_FSM))


def parse_smgr(rec: DecodedRecord) -> SmgrCreate | SmgrTruncate | None:
    if rec.rmid != RM_SMGR_ID:
        return None
    d = rec.main_data
    try:
        if rec.rmgr_info == XLOG_SMGR_CREATE:
            spc, db, rel, fork = struct.unpack_from("<IIIi", d)
            return SmgrCreate(RelFileLocator(spc, db, rel), fork)
        if rec.rmgr_info == XLOG_SMGR_TRUNCATE:
            blkno, spc, db, rel, flags = struct.unpack_from("<IIIIi", d)
            return SmgrTruncate(RelFileLocator(spc, db, rel), blkno, flags)
    except struct.error:
        raise invalid_record(rec.lsn, "truncated Storage record") from None
    return None


@dataclass
class DbaseCreate:
    db_id: int
    tablespace_id: int
    strategy: str  # "file_copy" (copies src directory, logged without page images) | "wal_log"
    src_db_id: int | None = None
    src_tablespace_id: int | None = None


@dataclass
class DbaseDrop:
    db_id: int
    tablespace_ids: list[int]


def parse_dbase(rec: DecodedRecord) -> DbaseCreate | DbaseDrop | None:
    if rec.rmid != RM_DBASE_ID:
        return None
    d = rec.main_data
    try:
        if rec.rmgr_info == XLOG_DBASE_CREATE_FILE_COPY:
            db, ts, src_db, src_ts = struct.unpack_from("<IIII", d)
            return DbaseCreate(db, ts, "file_copy", src_db, src_ts)
        if rec.rmgr_info == XLOG_DBASE_CREATE_WAL_LOG:
            db, ts = struct.unpack_from("<II", d)
            return DbaseCreate(db, ts, "wal_log")
        if rec.rmgr_info == XLOG_DBASE_DROP:
            db, cnt = struct.unpack_from("<Ii", d)
            return DbaseDrop(db, list(struct.unpack_from(f"<{cnt}I", d, 8)))
    except struct.error:
        raise invalid_record(rec.lsn, "truncated Database record") from None
    return None


@dataclass
class RelmapUpdate:
    """A new pg_filenode.map (the whole file) for a database, or the shared one (db_id 0)."""

    db_id: int
    tablespace_id: int
    data: bytes


def parse_relmap(rec: DecodedRecord) -> RelmapUpdate | None:
    if rec.rmid != RM_RELMAP_ID or rec.rmgr_info != XLOG_RELMAP_UPDATE:
        return None
    d = rec.main_data
    try:
        db, ts, nbytes = struct.unpack_from("<IIi", d)
    except struct.error:
        raise invalid_record(rec.lsn, "truncated RelMap record") from None
    if len(d) < 12 + nbytes:
        raise invalid_record(rec.lsn, "truncated RelMap record")
    return RelmapUpdate(db, ts, d[12:12 + nbytes])
