"""WAL record boundaries: reassemble PostgreSQL WAL records from a byte stream, sans I/O.

PostgreSQL writes WAL as 8 KiB pages grouped into segments (16 MiB by default).
Every page starts with a header (24 bytes; 40 bytes - the "long" header - on
the first page of a segment). Records start on 8-byte (MAXALIGN) boundaries and
may cross page and segment boundaries; the page holding a record's tail says so
with ``XLP_FIRST_IS_CONTRECORD`` and ``xlp_rem_len``. A record is an
``XLogRecord`` header (length, xid, prev-link, info, rmgr, CRC-32C) followed by
its body; the CRC covers the body and then the header up to the CRC field.
``XLOG_SWITCH`` ends a segment early: the rest of the segment is padding and the
next record starts at the next segment.

``WalStreamDecoder`` is fed the stream in arbitrary chunks and hands back whole
records (``RawRecord``) with page headers removed, checking page headers, CRCs
and prev-links on the way. It never reads files or sockets itself;
``find_end_of_wal`` drives it over a read callback to find where valid WAL ends.
The safekeeper and the pageserver use it to find record ends; ``decoder.py``
takes the records apart.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from crc32c import crc32c

from neonctl.engine.lsn import WAL_SEGMENT_SIZE, XLOG_BLCKSZ, format_lsn
from neonctl.errors import CorruptData

# Page header magic per PostgreSQL major version (xlog_internal.h, XLOG_PAGE_MAGIC).
PAGE_MAGIC_TO_PG_VERSION = {0xD110: 15, 0xD113: 16, 0xD116: 17, 0xD118: 18}

XLP_FIRST_IS_CONTRECORD = 0x0001
XLP_LONG_HEADER = 0x0002
XLP_BKP_REMOVABLE = 0x0004
XLP_FIRST_IS_OVERWRITE_CONTRECORD = 0x0008  # 0x0004 from PostgreSQL 19 on; 15-18 is what we read
XLP_ALL_FLAGS = 0x000F

SIZE_OF_SHORT_PAGE_HEADER = 24  # MAXALIGN(sizeof(XLogPageHeaderData))
SIZE_OF_LONG_PAGE_HEADER = 40  # MAXALIGN(sizeof(XLogLongPageHeaderData))
SIZE_OF_XLOG_RECORD = 24
MAX_RECORD_SIZE = 1020 * 1024 * 1024  # XLogRecordMaxSize

RM_XLOG_ID = 0
XLOG_SWITCH = 0x40

_PAGE_HDR = struct.Struct("<HHIQI")  # magic, info, tli, pageaddr, rem_len
_LONG_TAIL = struct.Struct("<QII")  # sysid, seg_size, xlog_blcksz
_REC_HDR = struct.Struct("<IIQBBxxI")  # tot_len, xid, prev, info, rmid, crc
_U32 = struct.Struct("<I")
_ZERO_PAGE_HEADER = bytes(SIZE_OF_SHORT_PAGE_HEADER)

_PAGE_MASK = XLOG_BLCKSZ - 1


class WalDecodeError(CorruptData):
    """The WAL bytes are not valid WAL at the position named in the message."""


class RawRecord(NamedTuple):
    """One whole WAL record: ``data`` is the XLogRecord header and body, page headers removed."""

    lsn: int
    end_lsn: int  # EndRecPtr: where the next record may start (aligned; next segment after XLOG_SWITCH)
    data: bytes

    @property
    def tot_len(self) -> int:
        return len(self.data)

    @property
    def xid(self) -> int:
        return _U32.unpack_from(self.data, 4)[0]

    @property
    def prev(self) -> int:
        return struct.unpack_from("<Q", self.data, 8)[0]

    @property
    def info(self) -> int:
        return self.data[16]

    @property
    def rmid(self) -> int:
        return self.data[17]


def maxalign(n: int) -> int:
    return (n + 7) & ~7


def _check_seg_size(seg_size: int) -> None:
    if seg_size & (seg_size - 1) or not (1 << 20) <= seg_size <= (1 << 30):
        raise ValueError(f"invalid WAL segment size {seg_size}: must be a power of two between 1 MiB and 1 GiB")


class WalStreamDecoder:
    """Turns a stream of WAL bytes starting at a record start into ``RawRecord``s.

    ``start_lsn`` must be where a record starts; it may be a page or segment
    boundary, and then the page header comes first. If that page begins with the
    tail of an earlier record (XLP_FIRST_IS_CONTRECORD), the tail is skipped, as
    PostgreSQL's XLogFindNextRecord does.

    ``feed()`` appends bytes that continue the stream; ``poll()`` returns the next
    complete, CRC-checked record or None when more bytes are needed - or when
    the stream shows an all-zero record length or page header, which is how
    unwritten WAL looks (``at_zeros`` tells the two apart; callers decide).
    Anything else that is not valid WAL raises ``WalDecodeError``; records
    completed before the bad spot are returned first.
    """

    def __init__(self, start_lsn: int, seg_size: int = WAL_SEGMENT_SIZE):
        _check_seg_size(seg_size)
        if start_lsn % 8:
            raise ValueError(f"WAL record start {format_lsn(start_lsn)} is not 8-byte aligned")
        self.seg_size = seg_size
        self.start_lsn = start_lsn
        self._buf = bytearray()
        self._base = start_lsn  # LSN of _buf[0]
        self._pos = start_lsn  # next record start, or a page boundary whose header comes first
        self._prev: int | None = None  # start of the previous record, for the prev-link check
        # progress on a record that spans pages: its start, the next page to check, bytes seen so far
        self._span_pos: int | None = None
        self._span_page = 0
        self._span_got = 0
        self._span_data_end = 0
        self._skip_contrecord = start_lsn & _PAGE_MASK == 0
        self._ready: deque[RawRecord] = deque()
        self._error: WalDecodeError | None = None
        self._last_end = start_lsn
        self._at_zeros = False
        self.page_magic: int | None = None
        self.system_id: int | None = None

    # -- public -----------------------------------------------------------

    @property
    def last_record_end(self) -> int:
        """End (EndRecPtr) of the last record returned by ``poll()``; ``start_lsn`` before any."""
        return self._last_end

    @property
    def fed_lsn(self) -> int:
        """LSN just past the last byte fed: where the next ``feed()`` continues."""
        return self._base + len(self._buf)

    @property
    def at_zeros(self) -> bool:
        """True if parsing stopped at an all-zero record length or page header."""
        return self._at_zeros

    @property
    def pg_version(self) -> int | None:
        """PostgreSQL major version, from the page magic (None until a page header was seen)."""
        return PAGE_MAGIC_TO_PG_VERSION.get(self.page_magic) if self.page_magic else None

    def feed(self, data: bytes) -> None:
        if not data:
            return
        fed_end = self._base + len(self._buf)
        if self._pos > fed_end:
            # Skipping XLOG_SWITCH padding (or alignment padding) that had not arrived yet.
            skip = self._pos - fed_end
            self._buf.clear()
            if skip >= len(data):
                self._base = fed_end + len(data)
                return
            self._base = self._pos
            self._buf += memoryview(data)[skip:]
            return
        self._buf += data

    def poll(self) -> RawRecord | None:
        if not self._ready and self._error is None:
            self._parse()
        if self._ready:
            rec = self._ready.popleft()
            self._last_end = rec.end_lsn
            return rec
        if self._error is not None:
            raise self._error
        return None

    def drain(self) -> list[RawRecord]:
        """All records complete so far (raises only if the bad spot comes before any of them)."""
        out = []
        try:
            while (rec := self.poll()) is not None:
                out.append(rec)
        except WalDecodeError:
            if not out:
                raise
        return out

    # -- parsing ----------------------------------------------------------

    def _fail(self, msg: str, lsn: int) -> WalDecodeError:
        return WalDecodeError(f"invalid WAL at {format_lsn(lsn)}: {msg}")

    def _page_header(self, buf, page_lsn: int) -> tuple[int, int, int] | None:
        """Validate the page header at page_lsn; return (size, xlp_info, rem_len), None if all zero.

        The caller has made sure the header's bytes are in the buffer.
        """
        off = page_lsn - self._base
        magic, info, _tli, pageaddr, rem_len = _PAGE_HDR.unpack_from(buf, off)
        if magic == 0 and buf[off:off + SIZE_OF_SHORT_PAGE_HEADER] == _ZERO_PAGE_HEADER:
            return None
        if magic != self.page_magic:
            if self.page_magic is not None:
                raise self._fail(f"page magic {magic:#06x} differs from {self.page_magic:#06x}", page_lsn)
            if magic not in PAGE_MAGIC_TO_PG_VERSION:
                raise self._fail(f"unknown page magic {magic:#06x} (PostgreSQL 15-18 expected)", page_lsn)
            self.page_magic = magic
        if info & ~XLP_ALL_FLAGS:
            raise self._fail(f"invalid page info bits {info:#06x}", page_lsn)
        if pageaddr != page_lsn:
            raise self._fail(f"page address is {format_lsn(pageaddr)}", page_lsn)
        if page_lsn % self.seg_size == 0:
            if not info & XLP_LONG_HEADER:
                raise self._fail("segment's first page lacks the long header", page_lsn)
            sysid, seg_size, blcksz = _LONG_TAIL.unpack_from(buf, off + SIZE_OF_SHORT_PAGE_HEADER)
            if seg_size != self.seg_size or blcksz != XLOG_BLCKSZ:
                raise self._fail(f"segment size {seg_size}/page size {blcksz} do not match", page_lsn)
            if self.system_id is None:
                self.system_id = sysid
            elif sysid != self.system_id:
                raise self._fail(f"system identifier {sysid} differs from {self.system_id}", page_lsn)
            return SIZE_OF_LONG_PAGE_HEADER, info, rem_len
        if info & XLP_LONG_HEADER:
            raise self._fail("unexpected long page header", page_lsn)
        return SIZE_OF_SHORT_PAGE_HEADER, info, rem_len

    def _header_size(self, page_lsn: int) -> int:
        return SIZE_OF_LONG_PAGE_HEADER if page_lsn % self.seg_size == 0 else SIZE_OF_SHORT_PAGE_HEADER

    def _parse(self) -> None:
        """Parse every record complete in the buffer onto ``_ready``; remember an error for later."""
        buf = self._buf
        mv = memoryview(buf)
        try:
            self._parse_into(buf, mv)
        except WalDecodeError as e:
            self._error = e.with_traceback(None)  # the traceback would keep views of _buf alive
        finally:
            mv.release()
        consumed = min(self._pos, self._base + len(buf)) - self._base
        if consumed > 0:
            del buf[:consumed]
            self._base += consumed

    def _parse_into(self, buf: bytearray, mv: memoryview) -> None:
        base = self._base
        avail_end = base + len(buf)
        seg_mask = self.seg_size - 1
        ready = self._ready
        unpack_u32 = _U32.unpack_from
        unpack_hdr = _REC_HDR.unpack_from
        pos = self._pos
        prev = self._prev
        self._at_zeros = False
        while True:
            if pos & _PAGE_MASK == 0:
                hsize = self._header_size(pos)
                if pos + hsize > avail_end:
                    return
                ph = self._page_header(buf, pos)
                if ph is None:
                    self._at_zeros = True
                    return
                hsize, info, rem_len = ph
                if info & XLP_FIRST_IS_CONTRECORD:
                    if not self._skip_contrecord:
                        raise self._fail("page continues a record although the previous one ended", pos)
                    room = XLOG_BLCKSZ - hsize
                    if rem_len > room:  # the tail goes on to the next page: skip this one entirely
                        pos += XLOG_BLCKSZ
                    else:
                        pos += hsize + maxalign(rem_len)
                        self._skip_contrecord = False
                    self._pos = pos
                    continue
                self._skip_contrecord = False
                pos += hsize
            if pos + 4 > avail_end:
                return
            off = pos - base
            tot_len = unpack_u32(buf, off)[0]
            if tot_len == 0:
                self._at_zeros = True
                return
            if tot_len < SIZE_OF_XLOG_RECORD or tot_len > MAX_RECORD_SIZE:
                raise self._fail(f"invalid record length {tot_len}", pos)
            page_end = (pos | _PAGE_MASK) + 1
            if pos + tot_len <= page_end:
                if pos + tot_len > avail_end:
                    return
                data = mv[off:off + tot_len].tobytes()
                end = pos + ((tot_len + 7) & ~7)
            else:
                # Spanning record. Check each continuation page header as soon as it arrives (a torn
                # record may have been overwritten), remembering how far we got; copy once it is all here.
                if self._span_pos != pos:
                    self._span_pos, self._span_page, self._span_got = pos, page_end, page_end - pos
                p, got = self._span_page, self._span_got
                overwritten = False
                while got < tot_len:
                    hs = SIZE_OF_LONG_PAGE_HEADER if p & seg_mask == 0 else SIZE_OF_SHORT_PAGE_HEADER
                    if p + hs > avail_end:
                        return
                    ph = self._page_header(buf, p)
                    if ph is None:
                        self._at_zeros = True
                        return
                    _, info, rem_len = ph
                    if info & XLP_FIRST_IS_OVERWRITE_CONTRECORD:
                        overwritten = True  # torn by a crash, its tail overwritten: drop it, read on
                        break
                    if not info & XLP_FIRST_IS_CONTRECORD:
                        raise self._fail(f"record at {format_lsn(pos)} continues on a page without contrecord flag", p)
                    if rem_len != tot_len - got:
                        raise self._fail(f"contrecord length {rem_len}, expected {tot_len - got}", p)
                    take = min(rem_len, XLOG_BLCKSZ - hs)
                    got += take
                    self._span_data_end = p + hs + take
                    p += XLOG_BLCKSZ
                    self._span_page, self._span_got = p, got
                if overwritten:
                    self._span_pos = None
                    pos = self._pos = p
                    continue
                data_end = self._span_data_end
                if data_end > avail_end:
                    return
                parts = [mv[off:page_end - base]]
                q = page_end
                left = tot_len - (page_end - pos)
                while left > 0:
                    hs = SIZE_OF_LONG_PAGE_HEADER if q & seg_mask == 0 else SIZE_OF_SHORT_PAGE_HEADER
                    take = min(left, XLOG_BLCKSZ - hs)
                    o = q - base + hs
                    parts.append(mv[o:o + take])
                    left -= take
                    q += XLOG_BLCKSZ
                data = b"".join(parts)
                del parts
                end = (data_end + 7) & ~7
                self._span_pos = None
            _, _xid, xl_prev, xl_info, xl_rmid, xl_crc = unpack_hdr(data)
            dv = memoryview(data)
            if crc32c(dv[:20], crc32c(dv[SIZE_OF_XLOG_RECORD:])) != xl_crc:
                raise self._fail("incorrect record CRC", pos)
            if prev is not None and xl_prev != prev:
                raise self._fail(f"record has prev-link {format_lsn(xl_prev)}, expected {format_lsn(prev)}", pos)
            if xl_rmid == RM_XLOG_ID and xl_info & 0xF0 == XLOG_SWITCH:
                end = (end + seg_mask) & ~seg_mask
            ready.append(RawRecord(pos, end, data))
            prev = self._prev = pos
            pos = self._pos = end


def find_end_of_wal(
    read: Callable[[int, int], bytes],
    start_lsn: int,
    upper_bound: int,
    seg_size: int = WAL_SEGMENT_SIZE,
    chunk_size: int = 1 << 20,
) -> int:
    """Return the end of the last valid record at or after ``start_lsn`` (a record start).

    ``read(lsn, n)`` returns up to n bytes of WAL at lsn (fewer or none where the
    WAL stops); nothing at or past ``upper_bound`` is read. The scan stops
    quietly at zeros, a bad CRC or header, or a record torn by ``upper_bound``
    or the end of data. A record must end by ``upper_bound`` to count, except
    that an XLOG_SWITCH ends, as in PostgreSQL, at the next segment boundary.
    """
    dec = WalStreamDecoder(start_lsn, seg_size)
    end = start_lsn
    pos = start_lsn
    while pos < upper_bound:
        n = min(chunk_size - pos % chunk_size, upper_bound - pos)
        data = read(pos, n)
        if not data:
            break
        if len(data) > n:
            data = data[:n]
        dec.feed(data)
        pos += len(data)
        try:
            while (rec := dec.poll()) is not None:
                if rec.end_lsn > upper_bound and not (rec.end_lsn % seg_size == 0 and _is_switch(rec)):
                    return end
                end = rec.end_lsn
        except WalDecodeError:
            break
        if dec.at_zeros:
            break
        if dec._pos > pos:  # XLOG_SWITCH: jump over the padding instead of reading it
            pos = dec._pos
            dec._buf.clear()
            dec._base = pos
        if len(data) < n:
            break
    return end


def _is_switch(rec: RawRecord) -> bool:
    return rec.data[17] == RM_XLOG_ID and rec.data[16] & 0xF0 == XLOG_SWITCH
