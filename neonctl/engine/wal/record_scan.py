"""Columnar WAL scan: raw page-structured WAL bytes to numpy arrays of records and block references.

``WalStreamDecoder`` + ``decode_record`` build Python objects per record, which
caps ingest at a few tens of MB/s. ``scan_wal`` does the same checks (page
headers, record reassembly across pages, CRC-32C, prev-links, the block
reference headers of DecodeXLogRecord) in one numba-compiled loop and hands
back column arrays: one row per record, one row per block reference, and the
reassembled record bytes back to back in ``data`` (each record 8-aligned).
The semantics and error messages are those of ``reader.py`` and
``decoder.py``; records that need the slow path (page images, main data
parsers) are available as ``RawRecord`` via ``RecordBatch.raw(i)``.

The scan is stateless: a record torn by the end of the buffer is left out and
the caller scans again from ``batch.end_lsn`` (passing the last record's LSN
as ``prev_lsn``) once more WAL has arrived.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from neonctl.engine.jit import (
    CRC_TABLE,
    byte_at,
    crc32c_update,
    jit,
    u16_le,
    u32_le,
    u64_le,
)
from neonctl.engine.lsn import WAL_SEGMENT_SIZE, XLOG_BLCKSZ, format_lsn
from neonctl.engine.wal.reader import (
    MAX_RECORD_SIZE,
    PAGE_MAGIC_TO_PG_VERSION,
    RawRecord,
    WalDecodeError,
    _check_seg_size,
)
from neonctl.engine.wal.scan_errors import (  # the kernels read these codes as constants
    D_BAD_HOLE,
    D_BLOCK_ID,
    D_COMPRESSED_FULL,
    D_DATA_LEN,
    D_HOLE,
    D_NO_DATA,
    D_ORDER,
    D_PAYLOAD,
    D_RUNS_PAST,
    D_SAME_REL,
    E_CONT_AFTER_END,
    E_CONTREC_LEN,
    E_CRC,
    E_INFO_BITS,
    E_MAGIC_DIFFERS,
    E_MAGIC_UNKNOWN,
    E_NO_CONTREC,
    E_NO_LONG,
    E_PAGEADDR,
    E_PREV,
    E_REC_LEN,
    E_SEGSIZE,
    E_SYSID,
    E_UNEXPECTED_LONG,
    ST_GROW,
    ST_MORE,
    ST_ZEROS,
)
from neonctl.engine.wal.scan_errors import (
    scan_error as _error,
)

__all__ = ["BLK_APPLY_IMAGE", "BLK_HAS_DATA", "BLK_HAS_IMAGE", "BLK_WILL_INIT", "RecordBatch", "scan_wal"]

# blk_flags bits
BLK_WILL_INIT = 1  # BKPBLOCK_WILL_INIT: redo does not need the old page
BLK_HAS_IMAGE = 2  # the record carries a page image of the block
BLK_APPLY_IMAGE = 4  # ... and redo applies it (BKPIMAGE_APPLY)
BLK_HAS_DATA = 8  # BKPBLOCK_HAS_DATA

_PAGE = XLOG_BLCKSZ
_PAGE_MASK = XLOG_BLCKSZ - 1
_MAGICS = np.array(sorted(PAGE_MAGIC_TO_PG_VERSION), dtype=np.int64)
_U64 = 0xFFFF_FFFF_FFFF_FFFF


_CRC_TAB = CRC_TABLE

# scan state (int64 array), kept across calls so a scan can resume after its output arrays grew
_S_POS, _S_PREV, _S_HAS_PREV, _S_SKIP, _S_MAGIC, _S_SYSID, _S_HAS_SYSID, _S_NREC, _S_NBLK, _S_DPOS, _S_END, \
    _S_NO_CRC = range(12)
_NSTATE = 12


_jit = jit
_b, _u16, _u32, _u64, _crc32c_state = byte_at, u16_le, u32_le, u64_le, crc32c_update


@_jit
def _copy(dst, d, src, s, n):
    for k in range(n):
        dst[np.uint64(d + k)] = src[np.uint64(s + k)]


@_jit
def _page_header(buf, i, page_lsn, seg_size, magics, st, err):
    """Check the page header at buf[i] (page_lsn) as WalStreamDecoder._page_header does.

    Returns (header size, xlp_info, xlp_rem_len); size 0 means an all-zero header, < 0 an error code.
    """
    magic = _u16(buf, i)
    info = _u16(buf, i + 2)
    if magic == 0:
        zero = True
        for k in range(24):
            if _b(buf, i + k) != 0:
                zero = False
                break
        if zero:
            return 0, 0, 0
    err[1] = page_lsn
    if magic != st[_S_MAGIC]:
        err[2] = magic
        err[3] = st[_S_MAGIC]
        if st[_S_MAGIC] >= 0:
            return E_MAGIC_DIFFERS, 0, 0
        known = False
        for m in magics:
            if m == magic:
                known = True
        if not known:
            return E_MAGIC_UNKNOWN, 0, 0
        st[_S_MAGIC] = magic
    if info & ~0xF:
        err[2] = info
        return E_INFO_BITS, 0, 0
    pageaddr = _u64(buf, i + 8)
    if pageaddr != page_lsn:
        err[2] = pageaddr
        return E_PAGEADDR, 0, 0
    rem_len = _u32(buf, i + 16)
    if page_lsn & (seg_size - 1) == 0:
        if not info & 2:
            return E_NO_LONG, 0, 0
        sysid = _u64(buf, i + 24)
        err[2] = _u32(buf, i + 32)
        err[3] = _u32(buf, i + 36)
        if err[2] != seg_size or err[3] != 8192:
            return E_SEGSIZE, 0, 0
        if st[_S_HAS_SYSID] == 0:
            st[_S_SYSID] = sysid
            st[_S_HAS_SYSID] = 1
        elif sysid != st[_S_SYSID]:
            err[2] = sysid
            err[3] = st[_S_SYSID]
            return E_SYSID, 0, 0
        return 40, info, rem_len
    if info & 2:
        return E_UNEXPECTED_LONG, 0, 0
    return 24, info, rem_len


@_jit
def _blocks(d, r, n, rec, nblk, brec, b32, b8, err):
    """Parse the block reference headers of the record d[r:r+n] like decoder.decode_record.

    Appends its block refs at nblk; returns (status, new nblk, main data length).
    """
    off = 24
    total = 0
    main_len = 0
    max_id = -1
    spc = db = rel = 0
    have_rel = False
    cap = brec.shape[0]
    nb = nblk
    while n - off > total:
        bid = _b(d, r + off)
        off += 1
        if bid == 255 or bid == 254:
            size = 1 if bid == 255 else 4
            if off + size > n:
                return D_RUNS_PAST, nblk, 0
            main_len = _b(d, r + off) if bid == 255 else _u32(d, r + off)
            off += size
            total += main_len
            break
        if bid == 253 or bid == 252:  # replication origin (u16), top-level xid (u32)
            size = 2 if bid == 253 else 4
            if off + size > n:
                return D_RUNS_PAST, nblk, 0
            off += size
            continue
        err[2] = bid
        if bid > 32:
            return D_BLOCK_ID, nblk, 0
        if bid <= max_id:
            return D_ORDER, nblk, 0
        max_id = bid
        if off + 3 > n:
            return D_RUNS_PAST, nblk, 0
        flags = _b(d, r + off)
        dlen = _u16(d, r + off + 1)
        off += 3
        err[2] = dlen
        if flags & 0x20:  # BKPBLOCK_HAS_DATA
            if dlen == 0:
                return D_NO_DATA, nblk, 0
        elif dlen:
            return D_DATA_LEN, nblk, 0
        total += dlen
        bflags = (1 if flags & 0x40 else 0) | (8 if flags & 0x20 else 0)
        bimg_len = hole_off = hole_len = bimg_info = 0
        if flags & 0x10:  # BKPBLOCK_HAS_IMAGE
            if off + 5 > n:
                return D_RUNS_PAST, nblk, 0
            bimg_len = _u16(d, r + off)
            hole_off = _u16(d, r + off + 2)
            bimg_info = _b(d, r + off + 4)
            off += 5
            hole_len = 0
            if bimg_info & 0x1C:  # compressed (pglz, lz4, zstd)
                if bimg_info & 1:
                    if off + 2 > n:
                        return D_RUNS_PAST, nblk, 0
                    hole_len = _u16(d, r + off)
                    off += 2
                if bimg_len == 8192:
                    return D_COMPRESSED_FULL, nblk, 0
            else:
                hole_len = 8192 - bimg_len
            err[2] = hole_off
            err[3] = hole_len
            err[4] = bimg_len
            if bimg_info & 1:  # BKPIMAGE_HAS_HOLE
                if hole_off == 0 or hole_len == 0 or bimg_len == 8192:
                    return D_BAD_HOLE, nblk, 0
            elif hole_off != 0 or hole_len != 0:
                return D_HOLE, nblk, 0
            total += bimg_len
            bflags |= 2 | (4 if bimg_info & 2 else 0)
        if flags & 0x80:  # BKPBLOCK_SAME_REL
            if not have_rel:
                return D_SAME_REL, nblk, 0
            if off + 4 > n:
                return D_RUNS_PAST, nblk, 0
            blkno = _u32(d, r + off)
            off += 4
        else:
            if off + 16 > n:
                return D_RUNS_PAST, nblk, 0
            spc = _u32(d, r + off)
            db = _u32(d, r + off + 4)
            rel = _u32(d, r + off + 8)
            blkno = _u32(d, r + off + 12)
            off += 16
            have_rel = True
        if nb >= cap:
            return ST_GROW, nblk, 0
        j = np.uint64(nb)
        brec[j] = rec
        b32[0, j] = spc
        b32[1, j] = db
        b32[2, j] = rel
        b32[3, j] = blkno
        b32[4, j] = (bimg_len << 16) | dlen
        b32[5, j] = (hole_off << 16) | hole_len
        b8[3, j] = bimg_info
        b8[0, j] = bid
        b8[1, j] = flags & 0x0F
        b8[2, j] = bflags
        nb += 1
    if n - off != total:
        err[2] = n - off
        err[3] = total
        return D_PAYLOAD, nblk, 0
    return 0, nb, main_len


@_jit
def _scan(buf, base, seg_size, tab, magics, st, err, data, r64, r32, r8, brec, b32, b8):
    """The scan loop of WalStreamDecoder._parse_into over buf (LSN base..), resumable via st.

    Writes complete records to data/r64/r32/r8 and their block refs to brec/b32/b8;
    returns ST_MORE (out of bytes), ST_ZEROS, ST_GROW (an output array is full) or an error code.
    """
    avail = base + buf.shape[0]
    seg_mask = seg_size - 1
    pos = st[_S_POS]
    prev = st[_S_PREV]
    has_prev = st[_S_HAS_PREV]
    skip = st[_S_SKIP]
    nrec = st[_S_NREC]
    nblk = st[_S_NBLK]
    dpos = st[_S_DPOS]
    last_end = st[_S_END]
    rcap = r64.shape[1]
    dcap = data.shape[0]
    status = ST_MORE
    while True:
        if pos & _PAGE_MASK == 0:
            hs = 40 if pos & seg_mask == 0 else 24
            if pos + hs > avail:
                break
            hs, info, rem = _page_header(buf, pos - base, pos, seg_size, magics, st, err)
            if hs <= 0:
                status = hs if hs < 0 else ST_ZEROS
                break
            if info & 1:  # XLP_FIRST_IS_CONTRECORD
                if skip == 0:
                    err[1] = pos
                    status = E_CONT_AFTER_END
                    break
                if rem > _PAGE - hs:
                    pos += _PAGE
                else:
                    pos += hs + ((rem + 7) & ~7)
                    skip = 0
                continue
            skip = 0
            pos += hs
        if pos + 4 > avail:
            break
        i = pos - base
        tot = _u32(buf, i)
        if tot == 0:
            status = ST_ZEROS
            break
        if tot < 24 or tot > MAX_RECORD_SIZE:
            err[1] = pos
            err[2] = tot
            status = E_REC_LEN
            break
        page_end = (pos | _PAGE_MASK) + 1
        if pos + tot <= page_end:
            if pos + tot > avail:
                break
            if nrec >= rcap or dpos + tot > dcap:
                status = ST_GROW
                break
            _copy(data, dpos, buf, i, tot)
            end = pos + ((tot + 7) & ~7)
        else:
            # Spanning record: check every continuation page header (a torn record may have been overwritten).
            p = page_end
            got = page_end - pos
            data_end = 0
            stop = 100  # 100: all of it seen; -100: overwritten; else a status
            while got < tot:
                hs = 40 if p & seg_mask == 0 else 24
                if p + hs > avail:
                    stop = ST_MORE
                    break
                hs, info, rem = _page_header(buf, p - base, p, seg_size, magics, st, err)
                if hs <= 0:
                    stop = hs if hs < 0 else ST_ZEROS
                    break
                if info & 8:  # XLP_FIRST_IS_OVERWRITE_CONTRECORD: drop the torn record, read on
                    stop = -100
                    break
                err[1] = p
                if not info & 1:
                    err[2] = pos
                    stop = E_NO_CONTREC
                    break
                if rem != tot - got:
                    err[2] = rem
                    err[3] = tot - got
                    stop = E_CONTREC_LEN
                    break
                take = min(rem, _PAGE - hs)
                got += take
                data_end = p + hs + take
                p += _PAGE
            if stop == -100:
                pos = p
                continue
            if stop != 100:
                status = stop
                break
            if data_end > avail:
                break
            if nrec >= rcap or dpos + tot > dcap:
                status = ST_GROW
                break
            q = dpos + page_end - pos
            _copy(data, dpos, buf, i, page_end - pos)
            p = page_end
            left = tot - (page_end - pos)
            while left > 0:
                hs = 40 if p & seg_mask == 0 else 24
                take = min(left, _PAGE - hs)
                o = p - base + hs
                _copy(data, q, buf, o, take)
                q += take
                left -= take
                p += _PAGE
            end = (data_end + 7) & ~7
        err[1] = pos
        if st[_S_NO_CRC] == 0:
            crc = _crc32c_state(tab, data, dpos + 24, dpos + tot, np.int64(0xFFFFFFFF))
            crc = _crc32c_state(tab, data, dpos, dpos + 20, crc) ^ 0xFFFFFFFF
            if crc != _u32(data, dpos + 20):
                status = E_CRC
                break
        xl_prev = _u64(data, dpos + 8)
        if has_prev != 0 and xl_prev != prev:
            err[2] = xl_prev
            err[3] = prev
            status = E_PREV
            break
        xl_info = _b(data, dpos + 16)
        rmid = _b(data, dpos + 17)
        if rmid == 0 and (xl_info & 0xF0) == 0x40:  # XLOG_SWITCH: the rest of the segment is padding
            end = (end + seg_mask) & ~seg_mask
        code, nb, main_len = _blocks(data, dpos, tot, nrec, nblk, brec, b32, b8, err)
        if code != 0:
            status = code
            break
        nblk = nb
        j = np.uint64(nrec)
        r64[0, j] = pos
        r64[1, j] = end
        r64[2, j] = dpos
        r64[3, j] = dpos + tot - main_len
        r64[4, j] = main_len
        r32[0, j] = tot
        r32[1, j] = _u32(data, dpos + 4)
        r8[0, j] = xl_info
        r8[1, j] = rmid
        nrec += 1
        dpos += (tot + 7) & ~7
        prev = pos
        has_prev = 1
        last_end = end
        pos = end
    st[_S_POS] = pos
    st[_S_PREV] = prev
    st[_S_HAS_PREV] = has_prev
    st[_S_SKIP] = skip
    st[_S_NREC] = nrec
    st[_S_NBLK] = nblk
    st[_S_DPOS] = dpos
    st[_S_END] = last_end
    return status


@dataclass(eq=False)
class RecordBatch:
    """The complete records of one scan, as columns; ``error``/``at_zeros`` say why the scan stopped early."""

    start_lsn: int
    end_lsn: int  # EndRecPtr of the last complete record (start_lsn if none): the next scan starts here
    data: np.ndarray  # uint8: every record's bytes (header + body, page headers removed), each 8-aligned
    lsn: np.ndarray  # uint64 record start
    end: np.ndarray  # uint64 EndRecPtr (next segment start after XLOG_SWITCH)
    off: np.ndarray  # int64 offset of the record in data
    tot_len: np.ndarray  # uint32
    xid: np.ndarray  # uint32
    info: np.ndarray  # uint8 xl_info
    rmid: np.ndarray  # uint8 xl_rmid
    main_off: np.ndarray  # int64 offset in data of the main data
    main_len: np.ndarray  # int64 main data length (0 if none)
    blk_rec: np.ndarray  # int64 record index of each block ref (ascending)
    blk_id: np.ndarray  # uint8
    blk_spc: np.ndarray  # uint32
    blk_db: np.ndarray  # uint32
    blk_rel: np.ndarray  # uint32
    blk_fork: np.ndarray  # uint8
    blk_no: np.ndarray  # uint32
    blk_flags: np.ndarray  # uint8: BLK_WILL_INIT | BLK_HAS_IMAGE | BLK_APPLY_IMAGE | BLK_HAS_DATA
    blk_sizes: np.ndarray  # uint32 bimg_len << 16 | data length (what follows the headers, per block)
    blk_hole_off: np.ndarray  # int64
    blk_hole_len: np.ndarray  # int64
    blk_bimg_info: np.ndarray  # uint8 BKPIMAGE_* bits
    error: WalDecodeError | None = None
    at_zeros: bool = False
    page_magic: int | None = None
    system_id: int | None = None

    def __len__(self) -> int:
        return len(self.lsn)

    def raw(self, i: int) -> RawRecord:
        """Record i as a RawRecord, for decode_record and the other slow-path helpers."""
        o = int(self.off[i])
        return RawRecord(int(self.lsn[i]), int(self.end[i]), self.data[o:o + int(self.tot_len[i])].tobytes())

    @property
    def pg_version(self) -> int | None:
        return PAGE_MAGIC_TO_PG_VERSION.get(self.page_magic) if self.page_magic else None

    @cached_property
    def _images(self) -> tuple[np.ndarray, np.ndarray]:
        return _image_locations(self.blk_rec, self.blk_sizes, self.main_off)

    @property
    def blk_img_off(self) -> np.ndarray:
        """int64 offset in ``data`` of each block's image bytes (as stored: hole removed, maybe compressed)."""
        return self._images[0]

    @property
    def blk_img_len(self) -> np.ndarray:
        """int64 bimg_len (0 without an image). Computed on first use: the receive path never needs it."""
        return self._images[1]

    @classmethod
    def concat(cls, batches: list[RecordBatch]) -> RecordBatch:
        """Consecutive batches as one (each starts where the previous ended): fewer, larger calls downstream."""
        if len(batches) == 1:
            return batches[0]
        data_at = np.cumsum([0] + [len(b.data) for b in batches[:-1]])
        rec_at = np.cumsum([0] + [len(b) for b in batches[:-1]])

        def cat(name: str, shift=None):
            cols = [getattr(b, name) for b in batches]
            if shift is not None:
                cols = [c + k for c, k in zip(cols, shift, strict=True)]
            return np.concatenate(cols)

        first, last = batches[0], batches[-1]
        return cls(
            start_lsn=first.start_lsn, end_lsn=last.end_lsn, data=cat("data"), lsn=cat("lsn"), end=cat("end"),
            off=cat("off", data_at), tot_len=cat("tot_len"), xid=cat("xid"), info=cat("info"), rmid=cat("rmid"),
            main_off=cat("main_off", data_at), main_len=cat("main_len"), blk_rec=cat("blk_rec", rec_at),
            blk_id=cat("blk_id"), blk_spc=cat("blk_spc"), blk_db=cat("blk_db"), blk_rel=cat("blk_rel"),
            blk_fork=cat("blk_fork"), blk_no=cat("blk_no"), blk_flags=cat("blk_flags"), blk_sizes=cat("blk_sizes"),
            blk_hole_off=cat("blk_hole_off"), blk_hole_len=cat("blk_hole_len"), blk_bimg_info=cat("blk_bimg_info"),
            error=last.error, at_zeros=last.at_zeros, page_magic=first.page_magic, system_id=first.system_id)


def _as_u8(buf) -> np.ndarray:
    """A read-only C-contiguous uint8 view (one array type, so one compiled kernel)."""
    if isinstance(buf, np.ndarray):
        a = np.ascontiguousarray(buf).reshape(-1)
        if a.dtype != np.uint8:
            a = a.view(np.uint8)
    else:
        a = np.frombuffer(buf, dtype=np.uint8)
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def _i64(v: int) -> int:
    v &= _U64
    return v - (1 << 64) if v >> 63 else v


def _grow(a: np.ndarray, n: int) -> np.ndarray:
    """a (1-d or rows x cap) with twice the capacity, its first n columns kept."""
    new = np.empty(a.shape[:-1] + (a.shape[-1] * 2,), dtype=a.dtype)
    new[..., :n] = a[..., :n]
    return new


def scan_wal(buf, start_lsn: int, seg_size: int = WAL_SEGMENT_SIZE, *, prev_lsn: int | None = None,
             page_magic: int | None = None, system_id: int | None = None, verify_crc: bool = True) -> RecordBatch:
    """Every complete record in buf (WAL at start_lsn..start_lsn+len(buf)), checked as WalStreamDecoder does.

    start_lsn is a record start or a page boundary; at a page boundary without ``prev_lsn`` a
    continued record's tail is skipped. ``prev_lsn`` (start of the record before start_lsn)
    enables the prev-link check of the first record. ``page_magic``/``system_id`` must match
    if given. Invalid WAL ends the batch with ``error`` set. ``verify_crc=False`` skips the records'
    CRC-32C (the scan's largest cost) for WAL this process already checked on its way in.
    """
    _check_seg_size(seg_size)
    if start_lsn % 8:
        raise ValueError(f"WAL record start {format_lsn(start_lsn)} is not 8-byte aligned")
    a = _as_u8(buf)
    n = a.shape[0]
    st = np.zeros(_NSTATE, dtype=np.int64)
    st[_S_POS] = st[_S_END] = start_lsn
    st[_S_PREV] = _i64(prev_lsn or 0)
    st[_S_HAS_PREV] = prev_lsn is not None
    # Without prev_lsn a page-aligned start may be mid-stream: skip a continued record's tail, as
    # WalStreamDecoder does. With it, start_lsn is where that record ended, so a tail there is an error.
    st[_S_SKIP] = start_lsn & _PAGE_MASK == 0 and prev_lsn is None
    st[_S_MAGIC] = -1 if page_magic is None else page_magic
    st[_S_SYSID] = _i64(system_id or 0)
    st[_S_NO_CRC] = not verify_crc  # WAL this process checked on its way in (a second pass over stored WAL)
    st[_S_HAS_SYSID] = system_id is not None
    err = np.zeros(5, dtype=np.int64)
    data = np.empty(n + 8, dtype=np.uint8)
    cap = n // 64 + 16  # pgbench averages ~90 bytes a record, ~1 block ref each; grown when short
    r64 = np.empty((5, cap), dtype=np.int64)
    r32 = np.empty((2, cap), dtype=np.uint32)
    r8 = np.empty((2, cap), dtype=np.uint8)
    brec = np.empty(cap, dtype=np.int64)
    b32 = np.empty((6, cap), dtype=np.uint32)
    b8 = np.empty((4, cap), dtype=np.uint8)
    while True:
        status = _scan(a, np.int64(start_lsn), np.int64(seg_size), _CRC_TAB, _MAGICS, st, err, data,
                       r64, r32, r8, brec, b32, b8)
        if status != ST_GROW:
            break
        nrec, nblk = int(st[_S_NREC]), int(st[_S_NBLK])
        if nrec >= r64.shape[1]:
            r64, r32, r8 = _grow(r64, nrec), _grow(r32, nrec), _grow(r8, nrec)
        else:  # a record's block refs did not fit (record data always fits: len(buf) + 8 bytes)
            brec, b32, b8 = _grow(brec, nblk), _grow(b32, nblk), _grow(b8, nblk)
    nrec, nblk = int(st[_S_NREC]), int(st[_S_NBLK])
    magic = int(st[_S_MAGIC])
    return RecordBatch(
        start_lsn=start_lsn, end_lsn=int(st[_S_END]), data=data[:int(st[_S_DPOS])],
        lsn=r64[0, :nrec].view(np.uint64), end=r64[1, :nrec].view(np.uint64), off=r64[2, :nrec],
        tot_len=r32[0, :nrec], xid=r32[1, :nrec], info=r8[0, :nrec], rmid=r8[1, :nrec],
        main_off=r64[3, :nrec], main_len=r64[4, :nrec],
        blk_rec=brec[:nblk], blk_id=b8[0, :nblk], blk_spc=b32[0, :nblk], blk_db=b32[1, :nblk],
        blk_rel=b32[2, :nblk], blk_fork=b8[1, :nblk], blk_no=b32[3, :nblk], blk_flags=b8[2, :nblk],
        blk_sizes=b32[4, :nblk], blk_hole_off=(b32[5, :nblk] >> 16).astype(np.int64),
        blk_hole_len=(b32[5, :nblk] & 0xFFFF).astype(np.int64), blk_bimg_info=b8[3, :nblk],
        error=_error(status, err) if status < 0 else None, at_zeros=status == ST_ZEROS,
        page_magic=magic if magic >= 0 else None,
        system_id=int(st[_S_SYSID]) & _U64 if st[_S_HAS_SYSID] else None,
    )


def _image_locations(brec: np.ndarray, lens: np.ndarray, main_off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offset in ``data`` and length of each block's image (0 without one).

    After the headers a record holds, block by block, the image then the data,
    and then the main data - so a record's block payloads end where its main
    data starts, and each image begins after the payloads of the blocks before it.
    """
    bimg = (lens >> 16).astype(np.int64)
    size = bimg + (lens & 0xFFFF).astype(np.int64)
    if not len(size):
        return size, bimg
    csum = np.cumsum(size)
    first = np.flatnonzero(np.concatenate([[True], brec[1:] != brec[:-1]]))  # each record's first block
    start_of_rec = np.repeat(csum[first] - size[first], np.diff(np.append(first, len(size))))
    before = csum - size - start_of_rec  # payload bytes of earlier blocks in the same record
    rec_total = np.repeat(np.add.reduceat(size, first), np.diff(np.append(first, len(size))))
    return main_off[brec] - rec_total + before, bimg
