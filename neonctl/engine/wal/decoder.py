"""WAL record decoding: a record's header, its block references and where its main data is.

A record (``RawRecord`` from ``reader.py``) is a 24-byte header, then block
reference headers, an optional origin / top-level xid, a main-data header, then
the payloads in the same order: for each block its page image (if any) and its
data, then the main data. Block references name the page a record changes
(tablespace/database/relfilenode, fork, block number); a page image ("FPI") is
stored without its zero "hole" and may be compressed (``page_image.py`` restores it).
``decode_record`` splits a record into these parts the way PostgreSQL's
DecodeXLogRecord does, and ``identify`` names its type as pg_waldump does; what
the main data means is ``rmgr_records.py``'s business.

Layouts are those of PostgreSQL 15-18; where they differ the helpers take the
major version (``WalStreamDecoder.pg_version`` knows it from the page magic).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from neonctl.engine.lsn import format_lsn
from neonctl.engine.wal.page_image import BLCKSZ, restore_image
from neonctl.engine.wal.reader import XLOG_SWITCH, RawRecord, WalDecodeError

LATEST_PG_VERSION = 18

# Resource managers (rmgrlist.h): the same ids and names in PostgreSQL 15-18.
RMGR_NAMES = (
    "XLOG", "Transaction", "Storage", "CLOG", "Database", "Tablespace", "MultiXact", "RelMap", "Standby",
    "Heap2", "Heap", "Btree", "Hash", "Gin", "Gist", "Sequence", "SPGist", "BRIN", "CommitTs",
    "ReplicationOrigin", "Generic", "LogicalMessage",
)
RMGR_NAMES_BY_VERSION = {v: RMGR_NAMES for v in (15, 16, 17, 18)}
RM_XLOG_ID, RM_XACT_ID, RM_SMGR_ID, RM_CLOG_ID, RM_DBASE_ID, RM_TBLSPC_ID, RM_MULTIXACT_ID, RM_RELMAP_ID = range(8)
RM_STANDBY_ID, RM_HEAP2_ID, RM_HEAP_ID, RM_BTREE_ID = 8, 9, 10, 11
RM_SEQ_ID, RM_LOGICALMSG_ID = 15, 21

XLR_INFO_MASK = 0x0F
XLR_RMGR_INFO_MASK = 0xF0

# XLOG rmgr (pg_control.h)
XLOG_CHECKPOINT_SHUTDOWN = 0x00
XLOG_CHECKPOINT_ONLINE = 0x10
XLOG_NEXTOID = 0x30
XLOG_FPI_FOR_HINT = 0xA0
XLOG_FPI = 0xB0
# Transaction rmgr (xact.h)
XLOG_XACT_COMMIT, XLOG_XACT_PREPARE, XLOG_XACT_ABORT = 0x00, 0x10, 0x20
XLOG_XACT_COMMIT_PREPARED, XLOG_XACT_ABORT_PREPARED = 0x30, 0x40
XLOG_XACT_OPMASK = 0x70
XLOG_XACT_HAS_INFO = 0x80
# Storage rmgr (storage_xlog.h)
XLOG_SMGR_CREATE, XLOG_SMGR_TRUNCATE = 0x10, 0x20
# Database rmgr (dbcommands_xlog.h)
XLOG_DBASE_CREATE_FILE_COPY, XLOG_DBASE_CREATE_WAL_LOG, XLOG_DBASE_DROP = 0x00, 0x10, 0x20
# RelMap rmgr (relmapper.h)
XLOG_RELMAP_UPDATE = 0x00

# Record layout (xlogrecord.h)
XLR_MAX_BLOCK_ID = 32
XLR_BLOCK_ID_DATA_SHORT = 255
XLR_BLOCK_ID_DATA_LONG = 254
XLR_BLOCK_ID_ORIGIN = 253
XLR_BLOCK_ID_TOPLEVEL_XID = 252
BKPBLOCK_FORK_MASK = 0x0F
BKPBLOCK_HAS_IMAGE = 0x10
BKPBLOCK_HAS_DATA = 0x20
BKPBLOCK_WILL_INIT = 0x40
BKPBLOCK_SAME_REL = 0x80
BKPIMAGE_HAS_HOLE = 0x01
BKPIMAGE_APPLY = 0x02
BKPIMAGE_COMPRESS_PGLZ = 0x04
BKPIMAGE_COMPRESS_LZ4 = 0x08
BKPIMAGE_COMPRESS_ZSTD = 0x10
_BKPIMAGE_COMPRESSED = BKPIMAGE_COMPRESS_PGLZ | BKPIMAGE_COMPRESS_LZ4 | BKPIMAGE_COMPRESS_ZSTD

FORK_NAMES = ("main", "fsm", "vm", "init")

_REC_HDR = struct.Struct("<IIQBB")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_BLK_HDR = struct.Struct("<BH")  # fork_flags, data_length
_IMG_HDR = struct.Struct("<HHB")  # bimg_len, hole_offset, bimg_info
_RLOC_BLK = struct.Struct("<IIII")


class BlockRef:
    """One page a record references. ``image`` is the full page (hole restored, decompressed), or None."""

    __slots__ = (
        "_image",
        "bimg",
        "bimg_info",
        "blkno",
        "block_id",
        "data",
        "db",
        "flags",
        "hole_length",
        "hole_offset",
        "rel",
        "spc",
    )

    def __init__(self, block_id: int, flags: int, spc: int, db: int, rel: int, blkno: int, data: bytes = b"",
                 bimg: bytes | None = None, bimg_info: int = 0, hole_offset: int = 0, hole_length: int = 0):
        self.block_id = block_id
        self.flags = flags
        self.spc = spc
        self.db = db
        self.rel = rel
        self.blkno = blkno
        self.data = data
        self.bimg = bimg  # the image as stored in the record (hole removed, maybe compressed)
        self.bimg_info = bimg_info
        self.hole_offset = hole_offset
        self.hole_length = hole_length
        self._image: bytes | None = None

    forknum = property(lambda self: self.flags & BKPBLOCK_FORK_MASK)
    has_image = property(lambda self: bool(self.flags & BKPBLOCK_HAS_IMAGE))
    has_data = property(lambda self: bool(self.flags & BKPBLOCK_HAS_DATA))
    will_init = property(lambda self: bool(self.flags & BKPBLOCK_WILL_INIT))
    apply_image = property(lambda self: bool(self.bimg_info & BKPIMAGE_APPLY))

    @property
    def inits_page(self) -> bool:
        """Redo does not need the page's earlier contents (WILL_INIT, or an image that is applied)."""
        return bool(self.flags & BKPBLOCK_WILL_INIT) or bool(self.bimg_info & BKPIMAGE_APPLY)

    @property
    def compression(self) -> str | None:
        info = self.bimg_info
        if info & BKPIMAGE_COMPRESS_PGLZ:
            return "pglz"
        if info & BKPIMAGE_COMPRESS_LZ4:
            return "lz4"
        if info & BKPIMAGE_COMPRESS_ZSTD:
            return "zstd"
        return None

    @property
    def image(self) -> bytes | None:
        if self.bimg is None:
            return None
        if self._image is None:
            self._image = restore_image(self)
        return self._image

    @property
    def fork(self) -> str:
        forknum = self.flags & BKPBLOCK_FORK_MASK
        return FORK_NAMES[forknum] if forknum < len(FORK_NAMES) else str(forknum)

    def __repr__(self) -> str:
        img = f" image({self.compression or 'raw'}{', apply' if self.apply_image else ''})" if self.bimg else ""
        init = " will_init" if self.will_init else ""
        return (f"BlockRef(#{self.block_id} {self.spc}/{self.db}/{self.rel} {self.fork} blk {self.blkno}"
                f"{img}{init} data={len(self.data)})")


@dataclass(slots=True)
class DecodedRecord:
    lsn: int
    end_lsn: int
    tot_len: int
    xid: int
    prev: int
    info: int
    rmid: int
    blocks: list[BlockRef]
    main_data: bytes
    origin: int | None = None
    toplevel_xid: int | None = None
    pg_version: int | None = None

    @property
    def rmgr(self) -> str:
        return rmgr_name(self.rmid)

    @property
    def rmgr_info(self) -> int:
        """The rmgr-specific opcode bits (xl_info & 0xF0)."""
        return self.info & XLR_RMGR_INFO_MASK

    @property
    def fpi_len(self) -> int:
        return sum(len(b.bimg) for b in self.blocks if b.bimg is not None)

    @property
    def is_switch(self) -> bool:
        return self.rmid == RM_XLOG_ID and self.info & XLR_RMGR_INFO_MASK == XLOG_SWITCH

    @property
    def is_fpi(self) -> bool:
        """XLOG_FPI or XLOG_FPI_FOR_HINT: the record is nothing but page images."""
        return self.rmid == RM_XLOG_ID and self.info & XLR_RMGR_INFO_MASK in (XLOG_FPI, XLOG_FPI_FOR_HINT)

    def identify(self) -> str | None:
        """The record type as pg_waldump names it ("COMMIT", "INSERT+INIT"), None if not known here."""
        return identify(self.rmid, self.info, self.pg_version or LATEST_PG_VERSION)

    def __repr__(self) -> str:
        return (f"DecodedRecord({format_lsn(self.lsn)} {self.rmgr} {self.identify() or hex(self.info)} "
                f"len {self.tot_len} xid {self.xid} blocks {self.blocks} main {len(self.main_data)})")


def rmgr_name(rmid: int) -> str:
    if rmid < len(RMGR_NAMES):
        return RMGR_NAMES[rmid]
    return f"custom{rmid:03d}" if rmid >= 128 else f"unknown{rmid}"


def invalid_record(raw_lsn: int, msg: str) -> WalDecodeError:
    return WalDecodeError(f"invalid WAL record at {format_lsn(raw_lsn)}: {msg}")


def decode_record(raw: RawRecord, pg_version: int | None = None) -> DecodedRecord:
    """Split a record into block references and main data, checking it as DecodeXLogRecord does."""
    data = raw.data
    lsn = raw.lsn
    n = len(data)
    tot_len, xid, prev, info, rmid = _REC_HDR.unpack_from(data)
    if tot_len != n:
        raise invalid_record(lsn, f"length {tot_len} but {n} bytes")
    off = 24
    datatotal = 0
    main_len = 0
    origin = toplevel = None
    heads: list[tuple] = []  # per block: the header fields, then image length (-1: none) and data length
    max_block_id = -1
    spc = db = rel = None
    try:
        while n - off > datatotal:
            block_id = data[off]
            off += 1
            if block_id == XLR_BLOCK_ID_DATA_SHORT:
                main_len = data[off]
                off += 1
                datatotal += main_len
                break
            if block_id == XLR_BLOCK_ID_DATA_LONG:
                main_len = _U32.unpack_from(data, off)[0]
                off += 4
                datatotal += main_len
                break
            if block_id == XLR_BLOCK_ID_ORIGIN:
                origin = _U16.unpack_from(data, off)[0]
                off += 2
                continue
            if block_id == XLR_BLOCK_ID_TOPLEVEL_XID:
                toplevel = _U32.unpack_from(data, off)[0]
                off += 4
                continue
            if block_id > XLR_MAX_BLOCK_ID:
                raise invalid_record(lsn, f"invalid block_id {block_id}")
            if block_id <= max_block_id:
                raise invalid_record(lsn, f"out-of-order block_id {block_id}")
            max_block_id = block_id
            flags, data_len = _BLK_HDR.unpack_from(data, off)
            off += 3
            if flags & BKPBLOCK_HAS_DATA:
                if data_len == 0:
                    raise invalid_record(lsn, "BKPBLOCK_HAS_DATA set, but no data included")
            elif data_len:
                raise invalid_record(lsn, f"BKPBLOCK_HAS_DATA not set, but data length is {data_len}")
            datatotal += data_len
            bimg_len = hole_offset = hole_length = bimg_info = 0
            if flags & BKPBLOCK_HAS_IMAGE:
                bimg_len, hole_offset, bimg_info = _IMG_HDR.unpack_from(data, off)
                off += 5
                if bimg_info & _BKPIMAGE_COMPRESSED:
                    if bimg_info & BKPIMAGE_HAS_HOLE:
                        hole_length = _U16.unpack_from(data, off)[0]
                        off += 2
                    if bimg_len == BLCKSZ:
                        raise invalid_record(lsn, "compressed block image has full length")
                else:
                    hole_length = BLCKSZ - bimg_len
                if bimg_info & BKPIMAGE_HAS_HOLE:
                    if hole_offset == 0 or hole_length == 0 or bimg_len == BLCKSZ:
                        raise invalid_record(lsn, f"bad hole (offset {hole_offset}, length {hole_length},"
                                                  f" image {bimg_len})")
                elif hole_offset or hole_length:
                    raise invalid_record(lsn, f"hole without BKPIMAGE_HAS_HOLE (offset {hole_offset},"
                                              f" length {hole_length})")
                datatotal += bimg_len
            if flags & BKPBLOCK_SAME_REL:
                if spc is None:
                    raise invalid_record(lsn, "BKPBLOCK_SAME_REL set but no previous rel")
                blkno = _U32.unpack_from(data, off)[0]
                off += 4
            else:
                spc, db, rel, blkno = _RLOC_BLK.unpack_from(data, off)
                off += 16
            heads.append((block_id, flags, spc, db, rel, blkno, bimg_info, hole_offset, hole_length,
                          bimg_len if flags & BKPBLOCK_HAS_IMAGE else -1, data_len))
    except (struct.error, IndexError):
        raise invalid_record(lsn, "record header runs past its length") from None
    if n - off != datatotal:
        raise invalid_record(lsn, f"{n - off} bytes of payload, headers promise {datatotal}")
    blocks = []
    for block_id, flags, spc, db, rel, blkno, bimg_info, hole_offset, hole_length, img_len, data_len in heads:
        bimg = None
        if img_len >= 0:
            bimg = data[off:off + img_len]
            off += img_len
        blk_data = data[off:off + data_len] if data_len else b""
        off += data_len
        blocks.append(BlockRef(block_id, flags, spc, db, rel, blkno, blk_data, bimg, bimg_info, hole_offset,
                               hole_length))
    main = data[off:off + main_len] if main_len else b""
    return DecodedRecord(lsn, raw.end_lsn, tot_len, xid, prev, info, rmid, blocks, main, origin, toplevel, pg_version)


# -- record types -------------------------------------------------------------

_XLOG_OPS = {
    0x00: "CHECKPOINT_SHUTDOWN", 0x10: "CHECKPOINT_ONLINE", 0x20: "NOOP", 0x30: "NEXTOID", 0x40: "SWITCH",
    0x50: "BACKUP_END", 0x60: "PARAMETER_CHANGE", 0x70: "RESTORE_POINT", 0x80: "FPW_CHANGE",
    0x90: "END_OF_RECOVERY", 0xA0: "FPI_FOR_HINT", 0xB0: "FPI", 0xD0: "OVERWRITE_CONTRECORD",
}
_XLOG_OPS_17 = {**_XLOG_OPS, 0xE0: "CHECKPOINT_REDO"}
_XACT_OPS = {0x00: "COMMIT", 0x10: "PREPARE", 0x20: "ABORT", 0x30: "COMMIT_PREPARED", 0x40: "ABORT_PREPARED",
             0x50: "ASSIGNMENT", 0x60: "INVALIDATION"}
_HEAP_OPS = {0x00: "INSERT", 0x10: "DELETE", 0x20: "UPDATE", 0x30: "TRUNCATE", 0x40: "HOT_UPDATE",
             0x50: "CONFIRM", 0x60: "LOCK", 0x70: "INPLACE"}
_HEAP2_OPS_15 = {0x00: "REWRITE", 0x10: "PRUNE", 0x20: "VACUUM", 0x30: "FREEZE_PAGE", 0x40: "VISIBLE",
                 0x50: "MULTI_INSERT", 0x60: "LOCK_UPDATED", 0x70: "NEW_CID"}
_HEAP2_OPS_17 = {**_HEAP2_OPS_15, 0x10: "PRUNE_ON_ACCESS", 0x20: "PRUNE_VACUUM_SCAN", 0x30: "PRUNE_VACUUM_CLEANUP"}
_BTREE_OPS = {0x00: "INSERT_LEAF", 0x10: "INSERT_UPPER", 0x20: "INSERT_META", 0x30: "SPLIT_L", 0x40: "SPLIT_R",
              0x50: "INSERT_POST", 0x60: "DEDUP", 0x70: "DELETE", 0x80: "UNLINK_PAGE", 0x90: "UNLINK_PAGE_META",
              0xA0: "NEWROOT", 0xB0: "MARK_PAGE_HALFDEAD", 0xC0: "VACUUM", 0xD0: "REUSE_PAGE",
              0xE0: "META_CLEANUP"}
_SIMPLE_OPS = {
    RM_SMGR_ID: {0x10: "CREATE", 0x20: "TRUNCATE"},
    RM_CLOG_ID: {0x00: "ZEROPAGE", 0x10: "TRUNCATE"},
    RM_DBASE_ID: {0x00: "CREATE_FILE_COPY", 0x10: "CREATE_WAL_LOG", 0x20: "DROP"},
    RM_MULTIXACT_ID: {0x00: "ZERO_OFF_PAGE", 0x10: "ZERO_MEM_PAGE", 0x20: "CREATE_ID", 0x30: "TRUNCATE_ID"},
    RM_RELMAP_ID: {0x00: "UPDATE"},
    RM_STANDBY_ID: {0x00: "LOCK", 0x10: "RUNNING_XACTS", 0x20: "INVALIDATIONS"},
    RM_BTREE_ID: _BTREE_OPS,
    RM_SEQ_ID: {0x00: "LOG"},
    RM_LOGICALMSG_ID: {0x00: "MESSAGE"},
}


def identify(rmid: int, info: int, pg_version: int = LATEST_PG_VERSION) -> str | None:
    op = info & XLR_RMGR_INFO_MASK
    if rmid == RM_XLOG_ID:
        return (_XLOG_OPS_17 if pg_version >= 17 else _XLOG_OPS).get(op)
    if rmid == RM_XACT_ID:
        return _XACT_OPS.get(op & XLOG_XACT_OPMASK)
    if rmid == RM_HEAP_ID:
        name = _HEAP_OPS[op & 0x70]
        return name + "+INIT" if op & 0x80 and name in ("INSERT", "UPDATE", "HOT_UPDATE") else name
    if rmid == RM_HEAP2_ID:
        name = (_HEAP2_OPS_17 if pg_version >= 17 else _HEAP2_OPS_15)[op & 0x70]
        return name + "+INIT" if op & 0x80 and name == "MULTI_INSERT" else name
    ops = _SIMPLE_OPS.get(rmid)
    return ops.get(op) if ops else None
