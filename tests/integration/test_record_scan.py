"""scan_wal (numba columnar WAL scan) against the reference: WalStreamDecoder + decode_record, on real and odd WAL."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from crc32c import crc32c
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neonctl.engine.wal import record_scan as rs
from neonctl.engine.wal.decoder import decode_record
from neonctl.engine.wal.reader import RawRecord, WalDecodeError, WalStreamDecoder
from neonctl.engine.wal.record_scan import (
    BLK_APPLY_IMAGE,
    BLK_HAS_DATA,
    BLK_HAS_IMAGE,
    BLK_WILL_INIT,
    scan_wal,
)

SEG16 = 16 << 20


def reference(buf: bytes, start: int, seg_size: int = SEG16):
    """What WalStreamDecoder + decode_record make of buf: (raw records, decoded records, error text, at_zeros)."""
    dec = WalStreamDecoder(start, seg_size)
    dec.feed(bytes(buf))
    raws, decs = [], []
    while True:
        try:
            r = dec.poll()
        except WalDecodeError as e:
            return raws, decs, str(e), False
        if r is None:
            return raws, decs, None, dec.at_zeros
        try:
            d = decode_record(r, dec.pg_version)
        except WalDecodeError as e:
            return raws, decs, str(e), False
        raws.append(r)
        decs.append(d)


def block_tuples(decs) -> list[tuple]:
    out = []
    for i, d in enumerate(decs):
        for b in d.blocks:
            flags = ((BLK_WILL_INIT if b.will_init else 0) | (BLK_HAS_IMAGE if b.has_image else 0)
                     | (BLK_APPLY_IMAGE if b.has_image and b.apply_image else 0) | (BLK_HAS_DATA if b.has_data else 0))
            out.append((i, b.block_id, b.spc, b.db, b.rel, b.forknum, b.blkno, flags))
    return out


def batch_blocks(batch) -> list[tuple]:
    cols = (batch.blk_rec, batch.blk_id, batch.blk_spc, batch.blk_db, batch.blk_rel, batch.blk_fork, batch.blk_no,
            batch.blk_flags)
    return list(zip(*(c.tolist() for c in cols), strict=False))


def assert_same(batch, raws, decs) -> None:
    """The batch has exactly these records, block refs and main data."""
    assert len(batch) == len(raws)
    assert [batch.raw(i) for i in range(len(batch))] == raws
    assert batch.lsn.tolist() == [r.lsn for r in raws]
    assert batch.end.tolist() == [r.end_lsn for r in raws]
    assert batch.tot_len.tolist() == [d.tot_len for d in decs]
    assert batch.xid.tolist() == [d.xid for d in decs]
    assert batch.info.tolist() == [d.info for d in decs]
    assert batch.rmid.tolist() == [d.rmid for d in decs]
    assert (batch.off % 8 == 0).all()
    for i, d in enumerate(decs):
        o, n = int(batch.main_off[i]), int(batch.main_len[i])
        assert batch.data[o:o + n].tobytes() == d.main_data, i
    assert batch_blocks(batch) == block_tuples(decs)
    assert batch.end_lsn == (raws[-1].end_lsn if raws else batch.start_lsn)


def assert_like_reference(buf, start: int, seg_size: int = SEG16, **kw):
    """scan_wal over buf gives what the reference gives: same records, same error text, same at_zeros."""
    raws, decs, err, zeros = reference(buf, start, seg_size)
    batch = scan_wal(buf, start, seg_size, **kw)
    assert_same(batch, raws, decs)
    assert (str(batch.error) if batch.error else None) == err
    assert batch.at_zeros == zeros
    return batch


_ref: dict[int, tuple] = {}


def sample_ref(sample):
    key = id(sample)
    if key not in _ref:
        buf = sample.read(sample.start_lsn, sample.end_lsn - sample.start_lsn)
        raws, decs, err, zeros = reference(buf, sample.start_lsn, sample.seg_size)
        assert err is None and not zeros and raws[-1].end_lsn == sample.end_lsn
        _ref[key] = raws, decs
    return _ref[key]


def scan_in_chunks(stream: bytes, start: int, cuts, seg_size: int):
    """A caller that gets WAL in pieces and re-scans from end_lsn each time; every record seen."""
    pos, prev, magic, sysid = start, None, None, None
    got: list[RawRecord] = []
    for c in sorted(set(cuts)) + [len(stream)]:
        lo = pos - start
        if c <= lo:
            continue
        b = scan_wal(memoryview(stream)[lo:c], pos, seg_size, prev_lsn=prev, page_magic=magic, system_id=sysid)
        assert b.error is None and not b.at_zeros
        got += [b.raw(i) for i in range(len(b))]
        if len(b):
            prev = int(b.lsn[-1])
        pos, magic, sysid = b.end_lsn, b.page_magic, b.system_id
    return got, pos


# -- real WAL -----------------------------------------------------------------


def test_whole_sample_matches_reader_and_decoder(wal_sample):
    raws, decs = sample_ref(wal_sample)
    buf = wal_sample.read(wal_sample.start_lsn, wal_sample.end_lsn - wal_sample.start_lsn)
    batch = scan_wal(buf, wal_sample.start_lsn, wal_sample.seg_size)
    assert batch.error is None and not batch.at_zeros
    assert_same(batch, raws, decs)
    assert batch.end_lsn == wal_sample.end_lsn
    assert batch.pg_version == wal_sample.version
    assert batch.system_id is not None  # the sample crosses segment boundaries (XLOG_SWITCH at least)
    flags = batch.blk_flags
    for bit in (BLK_WILL_INIT, BLK_HAS_IMAGE, BLK_APPLY_IMAGE, BLK_HAS_DATA):
        assert (flags & bit).any(), bit
    assert (np.diff(batch.blk_rec) >= 0).all()
    assert batch.lsn.dtype == np.uint64 and batch.off.dtype == np.int64 and batch.blk_no.dtype == np.uint32


def test_input_types(wal_sample):
    raws, decs = sample_ref(wal_sample)
    start = raws[100].lsn
    buf = wal_sample.read(start, raws[3000].end_lsn - start)
    want = raws[100:3001]
    for b in (buf, bytearray(buf), memoryview(buf), np.frombuffer(buf, np.uint8),
              np.frombuffer(b"\0" + buf, np.uint8)[1:]):  # unaligned too
        batch = scan_wal(b, start, wal_sample.seg_size)
        assert_same(batch, want, decs[100:3001])
    assert len(rs._scan.signatures) == 1  # one compiled kernel whatever the input type


def test_start_mid_stream_at_record(wal_sample):
    raws, decs = sample_ref(wal_sample)
    for i in (1, len(raws) // 3, len(raws) - 2):
        start = raws[i].lsn
        buf = wal_sample.read(start, wal_sample.end_lsn - start)
        assert_same(scan_wal(buf, start, wal_sample.seg_size), raws[i:], decs[i:])
        b = scan_wal(buf, start, wal_sample.seg_size, prev_lsn=raws[i - 1].lsn)
        assert b.error is None and len(b) == len(raws) - i
        b = scan_wal(buf, start, wal_sample.seg_size, prev_lsn=raws[i - 1].lsn + 8)
        assert len(b) == 0 and "prev-link" in str(b.error) and b.end_lsn == start


@pytest.mark.parametrize("where", ["page", "segment"])
def test_start_at_boundary_skips_continued_record(wal_sample, where):
    raws, decs = sample_ref(wal_sample)
    unit = 8192 if where == "page" else wal_sample.seg_size
    spanning = [r for r in raws if r.lsn // unit != (r.lsn + r.tot_len - 1) // unit]
    boundaries = [(r.lsn // unit + 1) * unit for r in spanning[:3]]
    clean = [r.end_lsn for r in raws[:-1] if r.end_lsn % unit == 0 and r.rmid != 0][:2]
    assert boundaries + clean
    for b in boundaries + clean:
        first = next(i for i, r in enumerate(raws) if r.lsn >= b)
        batch = scan_wal(wal_sample.read(b, wal_sample.end_lsn - b), b, wal_sample.seg_size)
        assert batch.error is None
        assert_same(batch, raws[first:], decs[first:])
    # with prev_lsn the start is a record's end: a continued record there is an error, not skipped
    b = boundaries[0]
    batch = scan_wal(wal_sample.read(b, 1 << 16), b, wal_sample.seg_size, prev_lsn=raws[0].lsn)
    assert len(batch) == 0 and "page continues a record although the previous one ended" in str(batch.error)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_chunks_rescan(wal_sample, data):
    """WAL arriving in random pieces, re-scanned from end_lsn each time: exactly the same records."""
    raws, _ = sample_ref(wal_sample)
    big = max(range(len(raws)), key=lambda i: raws[i].tot_len)
    i = data.draw(st.integers(max(0, big - 300), big), label="first record")
    j = min(len(raws), big + 300)
    start, end = raws[i].lsn, raws[j - 1].end_lsn
    stream = wal_sample.read(start, end - start)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=80), label="cuts")
    got, pos = scan_in_chunks(stream, start, cuts, wal_sample.seg_size)
    assert got == raws[i:j]
    assert pos == end


def test_rescan_across_xlog_switch(wal_sample):
    raws, decs = sample_ref(wal_sample)
    seg = wal_sample.seg_size
    k = next(i for i, r in enumerate(raws) if r.rmid == 0 and r.info & 0xF0 == 0x40)
    sw = raws[k]
    assert sw.end_lsn % seg == 0
    start = raws[k - 5].lsn
    # the buffer stops inside the padding after the switch: the switch record is complete
    batch = scan_wal(wal_sample.read(start, sw.lsn + sw.tot_len + 100 - start), start, seg)
    assert_same(batch, raws[k - 5:k + 1], decs[k - 5:k + 1])
    assert int(batch.end[-1]) == batch.end_lsn == sw.end_lsn
    # the next scan starts at the segment boundary
    nxt = scan_wal(wal_sample.read(sw.end_lsn, raws[k + 20].end_lsn - sw.end_lsn), sw.end_lsn, seg,
                   prev_lsn=sw.lsn, page_magic=batch.page_magic, system_id=batch.system_id)
    assert nxt.error is None
    assert_same(nxt, raws[k + 1:k + 21], decs[k + 1:k + 21])
    # scanning over the switch goes on in the next segment
    batch = scan_wal(wal_sample.read(start, raws[k + 20].end_lsn - start), start, seg)
    assert_same(batch, raws[k - 5:k + 21], decs[k - 5:k + 21])


def _last_byte(lsn: int, tot_len: int, seg: int) -> int:
    """Where a record's last byte is: page headers (24 bytes, 40 at a segment start) sit inside long records."""
    pos, left = lsn, tot_len
    while left > 8192 - pos % 8192:
        left -= 8192 - pos % 8192
        pos += 8192 - pos % 8192
        pos += 40 if pos % seg == 0 else 24
    return pos + left - 1


def test_torn_and_zeroed_tails(wal_sample):
    raws, _ = sample_ref(wal_sample)
    start = raws[len(raws) // 2].lsn
    tail = [r for r in raws if r.lsn > start + 100_000]
    big = max(tail, key=lambda r: r.tot_len)
    seg = wal_sample.seg_size
    for r in (tail[5], big, tail[-1]):
        start = next(x.lsn for x in raws if x.lsn >= r.lsn - 300_000)
        inside = r.lsn + r.tot_len // 2
        whole = wal_sample.read(start, r.end_lsn - start)
        # cut in the middle of the record: no error, the caller re-scans from end_lsn
        b = assert_like_reference(whole[:inside - start], start, seg)
        assert b.error is None and not b.at_zeros and b.end_lsn == raws[raws.index(r) - 1].end_lsn
        for zero_from in (inside, r.lsn):
            z = bytearray(whole)
            z[zero_from - start:] = bytes(len(z) - (zero_from - start))
            assert_like_reference(bytes(z), start, seg)
        # a bit flip in its last byte: CRC error, the records before it returned
        f = bytearray(whole)
        f[_last_byte(r.lsn, r.tot_len, seg) - start] ^= 0x10
        b = assert_like_reference(bytes(f), start, seg)
        assert "CRC" in str(b.error) and b.end_lsn == raws[raws.index(r) - 1].end_lsn


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_damage_like_reader(wal_sample, data):
    """Any flipped byte (record, page header, length field) or truncation: same records and error as the reader."""
    raws, _ = sample_ref(wal_sample)
    big = max(range(len(raws)), key=lambda i: raws[i].tot_len)
    i = data.draw(st.integers(max(0, big - 60), big), label="first record")
    start, end = raws[i].lsn, raws[min(len(raws), big + 60) - 1].end_lsn
    buf = bytearray(wal_sample.read(start, end - start))
    pos = data.draw(st.integers(0, len(buf) - 1), label="flip at")
    if data.draw(st.booleans(), label="page header"):
        pos = min(len(buf) - 1, pos - (start + pos) % 8192 + data.draw(st.integers(0, 39), label="header byte"))
        pos = max(pos, 0)
    buf[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    cut = data.draw(st.integers(pos, len(buf)), label="cut")
    assert_like_reference(bytes(buf[:cut]), start, wal_sample.seg_size)


def test_errors_after_good_records(wal_sample):
    raws, decs = sample_ref(wal_sample)
    start = raws[10].lsn
    bad = raws[20]
    data = bytearray(wal_sample.read(start, raws[30].end_lsn - start))
    data[bad.lsn - start + 30] ^= 0xFF
    b = assert_like_reference(bytes(data), start, wal_sample.seg_size)
    assert_same(b, raws[10:20], decs[10:20])
    assert isinstance(b.error, WalDecodeError) and "CRC" in str(b.error)


# -- synthetic WAL ------------------------------------------------------------


def layout(records, start: int = SEG16, seg: int = SEG16, magic: int = 0xD118, sysid: int = 7):
    """Lay (rmid, info, body) records out into WAL pages like PostgreSQL; return (bytes, lsns)."""
    buf = bytearray()
    lsns = []
    prev = 0

    def put(b):
        buf.extend(b)

    def page_header(rem):
        pos = start + len(buf)
        info = 1 if rem else 0
        if pos % seg == 0:
            put(struct.pack("<HHIQI4xQII", magic, info | 2, 1, pos, rem, sysid, seg, 8192))
        else:
            put(struct.pack("<HHIQI4x", magic, info, 1, pos, rem))

    for rmid, info, body in records:
        if (start + len(buf)) % 8192 == 0:
            page_header(0)
        hdr = struct.pack("<IIQBBxx", 24 + len(body), 0, prev, info, rmid)
        rec = hdr + struct.pack("<I", crc32c(hdr, crc32c(body))) + body
        prev = start + len(buf)
        lsns.append(prev)
        done = 0
        while done < len(rec):
            if (start + len(buf)) % 8192 == 0:
                page_header(len(rec) - done)
            chunk = rec[done:done + 8192 - (start + len(buf)) % 8192]
            put(chunk)
            done += len(chunk)
        put(bytes(-len(buf) % 8))
    return bytes(buf), lsns


REL = (1663, 5, 16384)


def blk(bid, flags, dlen=0, img=None, rel=REL, blkno=0) -> bytes:
    """A block reference header; img = (bimg_len, hole_offset, bimg_info[, hole_length])."""
    h = struct.pack("<BBH", bid, flags, dlen)
    if img is not None:
        h += struct.pack("<HHB", *img[:3]) + (struct.pack("<H", img[3]) if len(img) > 3 else b"")
    if rel is not None:
        h += struct.pack("<III", *rel)
    return h + struct.pack("<I", blkno)


def main_hdr(n: int) -> bytes:
    return bytes([255, n]) if n < 256 else bytes([254]) + struct.pack("<I", n)


GOOD = [
    # data + will_init, then SAME_REL, replication origin and top-level xid, short main data
    blk(0, 0x60, 10, blkno=3) + blk(1, 0x80, rel=None, blkno=7) + b"\xfd\x01\x00" + b"\xfc" + struct.pack("<I", 99)
    + main_hdr(5) + b"d" * 10 + b"mmmmm",
    # compressed image with a hole (not applied), other fork, long main data
    blk(2, 0x12, img=(50, 100, 0x04 | 0x01, 200), rel=(1664, 0, 1262), blkno=1) + main_hdr(300) + b"i" * 50
    + b"M" * 300,
    # uncompressed full page image to apply, plus data
    blk(0, 0x30, 4, img=(8192, 0, 0x02), blkno=9) + b"I" * 8192 + b"dddd",
    # uncompressed image with a hole, no main data
    blk(32, 0x10, img=(8000, 400, 0x01 | 0x02), blkno=2) + b"h" * 8000,
    b"\xff\x00",  # empty main data
]

BAD = {
    "invalid block_id": blk(40, 0),
    "out-of-order": blk(1, 0) + blk(0, 0x80, rel=None),
    "no data included": blk(0, 0x20, 0),
    "data length is 5": blk(0, 0, 5) + b"x" * 5,
    "compressed block image has full length": blk(0, 0x10, img=(8192, 0, 0x04)),
    "bad hole": blk(0, 0x10, img=(50, 0, 0x05, 100)) + b"x" * 50,
    "hole without": blk(0, 0x10, img=(100, 0, 0x00)) + b"x" * 100,
    "SAME_REL set but no previous rel": blk(0, 0x80, rel=None),
    "runs past": b"\x00\x20",
    "runs past (main data)": b"\xfe\x01\x00",
    "payload": blk(0, 0x20, 10) + b"xyz",
    "payload (extra)": main_hdr(2) + b"abcdef",
    "hole without (compressed)": blk(0, 0x10, img=(50, 30, 0x04)) + b"x" * 50,
}


def test_block_refs_of_synthetic_records():
    buf, _ = layout([(10, 0, body) for body in GOOD])
    b = assert_like_reference(buf, SEG16)
    assert len(b) == len(GOOD)
    assert b.blk_flags.tolist() == [BLK_WILL_INIT | BLK_HAS_DATA, 0, BLK_HAS_IMAGE,
                                     BLK_HAS_IMAGE | BLK_APPLY_IMAGE | BLK_HAS_DATA, BLK_HAS_IMAGE | BLK_APPLY_IMAGE]
    assert b.blk_rel.tolist() == [16384, 16384, 1262, 16384, 16384] and b.blk_fork.tolist() == [0, 0, 2, 0, 0]
    assert b.main_len.tolist() == [5, 300, 0, 0, 0]


@pytest.mark.parametrize("what", sorted(BAD))
def test_malformed_record_with_good_crc(what):
    buf, lsns = layout([(10, 0, GOOD[0]), (10, 0, GOOD[1]), (10, 0, BAD[what]), (10, 0, GOOD[0])])
    b = assert_like_reference(buf, SEG16)
    assert len(b) == 2 and b.end_lsn == lsns[2]
    assert str(b.error).startswith(f"invalid WAL record at 0/{lsns[2]:X}: ")
    assert what.split(" (")[0] in str(b.error)


def test_output_arrays_grow():
    """More records (tiny ones) and more block refs (33 per record) than the first guess holds."""
    many_blocks = blk(0, 0x20, 1) + b"".join(blk(k, 0xA0, 1, rel=None, blkno=k) for k in range(1, 33)) + b"d" * 33
    recs = [(21, 0, b"\xff\x00")] * 3000 + [(10, 0, many_blocks)] * 300 + [(21, 0, b"\xff\x01x")] * 100
    buf, _ = layout(recs)
    b = assert_like_reference(buf, SEG16)
    assert len(b) == 3400 and len(b.blk_rec) == 300 * 33


def test_bad_page_headers(WalWriter):
    w = WalWriter(SEG16)
    for i in range(200):
        w.append(21, 0, bytes([i % 251]) * 300)
    good = w.data()
    b = scan_wal(good, SEG16)
    assert len(b) == 200 and b.pg_version == 18 and b.system_id == 7 and b.page_magic == 0xD118

    def fails(mutate, msg):
        buf = bytearray(good)
        mutate(buf)
        batch = assert_like_reference(bytes(buf), SEG16)
        assert msg in str(batch.error)

    fails(lambda b: b.__setitem__(slice(0, 2), b"\x99\x99"), "page magic")
    fails(lambda b: b.__setitem__(slice(8192, 8194), struct.pack("<H", 0xD110)), "differs")
    fails(lambda b: b.__setitem__(slice(8192 + 8, 8192 + 16), struct.pack("<Q", 5 << 24)), "page address")
    fails(lambda b: b.__setitem__(slice(8192 + 8, 8192 + 16), struct.pack("<Q", 0xFFFF_FFFF_0000_2000)),
          "page address is FFFFFFFF/2000")
    fails(lambda b: b.__setitem__(slice(8192 + 2, 8192 + 4), b"\x00\x01"), "info bits")
    fails(lambda b: b.__setitem__(slice(8192 + 2, 8192 + 4), b"\x03\x00"), "unexpected long page header")
    fails(lambda b: b.__setitem__(slice(8192 + 16, 8192 + 20), struct.pack("<I", 3)), "contrecord length")
    fails(lambda b: b.__setitem__(slice(8192 + 2, 8192 + 4), b"\x00\x00"), "without contrecord flag")
    fails(lambda b: b.__setitem__(slice(2, 4), b"\x00\x00"), "long header")
    fails(lambda b: b.__setitem__(slice(32, 36), struct.pack("<I", 1 << 20)), "segment size")
    fails(lambda b: b.__setitem__(slice(40, 44), struct.pack("<I", 12)), "invalid record length")
    # the values a caller remembers from earlier batches must match
    b = scan_wal(good, SEG16, page_magic=0xD116)
    assert len(b) == 0 and str(b.error) == "invalid WAL at 0/1000000: page magic 0xd118 differs from 0xd116"
    b = scan_wal(good, SEG16, system_id=(1 << 64) - 1)
    assert str(b.error) == f"invalid WAL at 0/1000000: system identifier 7 differs from {(1 << 64) - 1}"


def test_big_system_id(WalWriter):
    w = WalWriter(SEG16, sysid=(1 << 63) + 5)
    w.append(21, 0, b"x" * 10)
    b = scan_wal(w.data(), SEG16, system_id=(1 << 63) + 5)
    assert len(b) == 1 and b.system_id == (1 << 63) + 5


def test_zero_length_means_no_more_records_yet(WalWriter):
    w = WalWriter(SEG16)
    for _ in range(3):
        w.append(21, 0, b"x" * 100)
    b = assert_like_reference(w.data() + bytes(4096), SEG16)
    assert len(b) == 3 and b.at_zeros and b.error is None and b.end_lsn == w.ends[-1]
    w.pad_to_page()
    b = assert_like_reference(w.data() + bytes(8192), SEG16)
    assert len(b) == 3 and b.at_zeros
    b = scan_wal(w.data()[:w.ends[-1] - SEG16], SEG16)  # stops where the bytes stop: not zeros
    assert len(b) == 3 and not b.at_zeros
    assert scan_wal(bytes(100), SEG16).at_zeros


def test_prev_link_checked(WalWriter):
    w = WalWriter(SEG16)
    w.append(21, 0, b"a" * 50)
    w.prev = 12345
    w.append(21, 0, b"b" * 50)
    b = assert_like_reference(w.data(), SEG16)
    assert len(b) == 1 and "prev-link 0/3039, expected 0/1000028" in str(b.error)


def test_overwritten_contrecord_is_skipped(WalWriter):
    w = WalWriter(SEG16)
    a = w.append(21, 0, b"a" * 8000)
    room = 8192 - w.pos % 8192
    w.append(21, 0, b"b" * 5000, limit=room)
    w.next_page_flags = 0x0008
    c = w.append(0, 0xD0, struct.pack("<Qq", w.pos, 0))
    b = assert_like_reference(w.data(), SEG16)
    assert b.lsn.tolist() == [a, c] and b.error is None
    # only up to the torn part: nothing after a, and a re-scan from a's end finds c
    cut = assert_like_reference(w.data()[:8192 + 10], SEG16)
    assert cut.end_lsn == w.ends[0]
    got, _ = scan_in_chunks(w.data(), SEG16, [8192 + 10, 8192 + 30], SEG16)
    assert [r.lsn for r in got] == [a, c]


def test_xlog_switch_synthetic():
    seg = 1 << 20
    recs = [(21, 0, main_hdr(100) + b"a" * 100), (0, 0x40, b"")]
    buf, lsns = layout(recs, start=seg, seg=seg)
    buf += bytes(seg - len(buf))
    more, lsns2 = layout([(21, 0, main_hdr(100) + b"b" * 100)] * 3, start=2 * seg, seg=seg)
    whole = buf + more
    # prev-links across the switch (layout starts each part with prev 0): checked only from the second record on
    b = scan_wal(whole, seg, seg)
    assert b.lsn.tolist()[:2] == lsns and int(b.end[1]) == 2 * seg
    assert "prev-link" in str(b.error) and b.end_lsn == 2 * seg
    b = scan_wal(buf[:lsns[1] - seg + 30], seg, seg)
    assert len(b) == 2 and b.end_lsn == 2 * seg and b.error is None
    b = scan_wal(more, 2 * seg, seg)
    assert b.lsn.tolist() == lsns2


def test_records_across_segments_small_segments(WalWriter):
    seg = 1 << 20
    w = WalWriter(3 * seg, seg_size=seg)
    sizes = [30, 8000, 8170, 8192, 20_000, 3, 300_000, 100, 1_500_000, 7]
    for k in range(60):
        w.append(21, 0, bytes([k]) * sizes[k % len(sizes)])
    data = w.data()
    b = assert_like_reference(data, 3 * seg, seg)
    assert b.lsn.tolist() == w.lsns and b.end.tolist() == w.ends
    got, end = scan_in_chunks(data, 3 * seg, range(0, len(data), 65_537), seg)
    assert [r.lsn for r in got] == w.lsns and end == w.ends[-1]


def test_start_must_be_aligned():
    with pytest.raises(ValueError, match="8-byte aligned"):
        scan_wal(b"", 12)
    with pytest.raises(ValueError):
        scan_wal(b"", 0, seg_size=3 << 20)
    b = scan_wal(b"", 16)
    assert len(b) == 0 and b.end_lsn == 16 and b.error is None and not b.at_zeros and b.pg_version is None


def test_crc32c_matches_package():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, 5000, dtype=np.uint8)
    for i, j in [(0, 0), (0, 1), (3, 11), (7, 4096), (1, 4999), (0, 5000)] + [
            tuple(sorted(rng.integers(0, 5001, 2))) for _ in range(50)]:
        got = rs._crc32c_state(rs._CRC_TAB, a, i, j, np.int64(0xFFFFFFFF)) ^ 0xFFFFFFFF
        assert got == crc32c(a[i:j].tobytes()), (i, j)


def test_block_image_locations_match_decoder(wal_sample):
    """blk_img_off/len and the hole fields point at exactly the image bytes decode_record finds."""
    from neonctl.engine.wal.decoder import decode_record as _decode

    data = wal_sample.read(wal_sample.start_lsn, wal_sample.end_lsn - wal_sample.start_lsn)
    b = scan_wal(data, wal_sample.start_lsn, wal_sample.seg_size)
    seen = 0
    for j in np.flatnonzero(b.blk_img_len).tolist():
        i = int(b.blk_rec[j])
        rec = _decode(b.raw(i), wal_sample.version)
        blk = next(x for x in rec.blocks if x.block_id == int(b.blk_id[j]))
        off = int(b.blk_img_off[j])
        assert bytes(b.data[off:off + int(b.blk_img_len[j])]) == blk.bimg
        assert (int(b.blk_hole_off[j]), int(b.blk_hole_len[j]), int(b.blk_bimg_info[j])) == \
            (blk.hole_offset, blk.hole_length, blk.bimg_info)
        seen += 1
    assert seen > 10


def test_concat_of_consecutive_batches_equals_one_scan(wal_sample):
    """Batches scanned message by message and joined are the batch one scan of the whole range gives."""
    data = wal_sample.read(wal_sample.start_lsn, wal_sample.end_lsn - wal_sample.start_lsn)
    whole = scan_wal(data, wal_sample.start_lsn, wal_sample.seg_size)
    parts, pos, prev = [], wal_sample.start_lsn, None
    while pos < whole.end_lsn:
        b = scan_wal(data[pos - wal_sample.start_lsn: pos - wal_sample.start_lsn + 40_000], pos,
                     wal_sample.seg_size, prev_lsn=prev)
        assert b.error is None
        if not len(b):
            b = scan_wal(data[pos - wal_sample.start_lsn:], pos, wal_sample.seg_size, prev_lsn=prev)
        parts.append(b)
        pos, prev = b.end_lsn, int(b.lsn[-1])
    joined = rs.RecordBatch.concat(parts)
    assert len(parts) > 3 and len(joined) == len(whole) and joined.end_lsn == whole.end_lsn
    for i in range(0, len(whole), max(1, len(whole) // 200)):
        assert joined.raw(i) == whole.raw(i)
    for col in ("blk_rec", "blk_spc", "blk_rel", "blk_no", "blk_flags", "blk_img_len", "main_len"):
        assert (getattr(joined, col) == getattr(whole, col)).all(), col
    imgs = np.flatnonzero(whole.blk_img_len)
    for j in imgs[:: max(1, len(imgs) // 50)].tolist():
        a, b = int(joined.blk_img_off[j]), int(whole.blk_img_off[j])
        n = int(whole.blk_img_len[j])
        assert bytes(joined.data[a:a + n]) == bytes(whole.data[b:b + n])


def test_without_crc_check_same_records_and_a_flip_passes(wal_sample):
    """verify_crc=False (stored WAL read a second time) returns the same columns; only the CRC goes unchecked."""
    raws, decs = sample_ref(wal_sample)
    buf = wal_sample.read(wal_sample.start_lsn, wal_sample.end_lsn - wal_sample.start_lsn)
    batch = scan_wal(buf, wal_sample.start_lsn, wal_sample.seg_size, verify_crc=False)
    assert batch.error is None
    assert_same(batch, raws, decs)
    start, bad = raws[10].lsn, raws[20]
    data = bytearray(wal_sample.read(start, raws[30].end_lsn - start))
    data[bad.lsn - start + 20] ^= 0xFF  # in the stored CRC itself
    assert "CRC" in str(scan_wal(bytes(data), start, wal_sample.seg_size).error)
    unchecked = scan_wal(bytes(data), start, wal_sample.seg_size, verify_crc=False)
    assert unchecked.error is None and len(unchecked) == 21  # raws[10] .. raws[30]
