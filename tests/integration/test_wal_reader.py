"""WalStreamDecoder and find_end_of_wal against WAL from real PostgreSQL 18 and 15 (and synthetic WAL)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neonctl.engine.wal.decoder import RMGR_NAMES
from neonctl.engine.wal.reader import (
    RawRecord,
    WalDecodeError,
    WalStreamDecoder,
    find_end_of_wal,
)
from neonctl.errors import CorruptData

_parsed: dict[int, list[RawRecord]] = {}


def all_records(sample) -> list[RawRecord]:
    """Every record from sample.start_lsn to its end, parsed in one go (cached per sample)."""
    key = id(sample)
    if key not in _parsed:
        dec = WalStreamDecoder(sample.start_lsn, sample.seg_size)
        dec.feed(sample.read(sample.start_lsn, sample.end_lsn - sample.start_lsn))
        recs = []
        while (r := dec.poll()) is not None:
            recs.append(r)
        assert not dec.at_zeros
        _parsed[key] = recs
    return _parsed[key]


def next_record_lsn(end: int, seg_size: int) -> int:
    """Where the record after one ending at `end` starts (past the page header at a page boundary)."""
    if end % 8192:
        return end
    return end + (40 if end % seg_size == 0 else 24)


def test_records_match_pg_waldump(wal_sample):
    recs = all_records(wal_sample)
    dump = wal_sample.waldump
    assert [r.lsn for r in recs] == [d.lsn for d in dump]
    for r, d, nxt in zip(recs, dump, dump[1:] + [None], strict=False):
        assert (r.tot_len, r.prev, r.xid, RMGR_NAMES[r.rmid]) == (d.tot_len, d.prev, d.xid, d.rmgr), d
        assert len(r.data) == d.tot_len
        if nxt is not None:
            assert next_record_lsn(r.end_lsn, wal_sample.seg_size) == nxt.lsn, d
    assert recs[-1].end_lsn == wal_sample.end_lsn
    # The sample really has the hard cases in it.
    spans_page = [r for r in recs if r.lsn // 8192 != (r.lsn + r.tot_len - 1) // 8192]
    spans_seg = [r for r in recs if r.lsn // wal_sample.seg_size != (r.lsn + r.tot_len - 1) // wal_sample.seg_size]
    assert len(spans_page) > 100
    assert spans_seg or wal_sample.seg_size == 16 << 20  # the PG 15 sample has 1 MiB segments
    assert max(r.tot_len for r in recs) > 200_000


def test_xlog_switch_ends_at_next_segment(wal_sample):
    recs = all_records(wal_sample)
    switches = [i for i, r in enumerate(recs) if r.rmid == 0 and r.info & 0xF0 == 0x40]
    assert switches
    for i in switches:
        assert recs[i].end_lsn % wal_sample.seg_size == 0
        assert recs[i].end_lsn - recs[i].lsn <= wal_sample.seg_size
        assert recs[i + 1].lsn == recs[i].end_lsn + 40


def _decode_from(sample, start: int, chunks=None) -> list[RawRecord]:
    dec = WalStreamDecoder(start, sample.seg_size)
    data = sample.read(start, sample.end_lsn - start)
    out = []
    pos = 0
    for size in chunks or [len(data)]:
        dec.feed(data[pos:pos + size])
        pos += size
        while (r := dec.poll()) is not None:
            out.append(r)
            assert dec.last_record_end == r.end_lsn
    dec.feed(data[pos:])
    out.extend(iter(dec.poll, None))
    return out


def test_start_mid_stream_at_record(wal_sample):
    recs = all_records(wal_sample)
    for i in (1, len(recs) // 3, len(recs) - 2):
        assert _decode_from(wal_sample, recs[i].lsn) == recs[i:]


@pytest.mark.parametrize("where", ["page", "segment"])
def test_start_at_boundary_skips_continued_record(wal_sample, where):
    """Starting at a page/segment boundary: the tail of a record from before it is skipped."""
    recs = all_records(wal_sample)
    unit = 8192 if where == "page" else wal_sample.seg_size
    # boundaries whose page begins with a continuation, and ones that do not
    spanning = [r for r in recs if r.lsn // unit != (r.lsn + r.tot_len - 1) // unit]
    boundaries = [(r.lsn // unit + 1) * unit for r in spanning[:3]]
    clean = [r.end_lsn for r in recs[:-1] if r.end_lsn % unit == 0 and r.rmid != 0][:2]
    assert boundaries + clean
    for b in boundaries + clean:
        first = next(i for i, r in enumerate(recs) if r.lsn >= b)
        got = _decode_from(wal_sample, b)
        assert got == recs[first:], hex(b)


def _feed_in_chunks(dec: WalStreamDecoder, stream: bytes, cuts: list[int]) -> list[RawRecord]:
    got = []
    prev = 0
    for c in sorted(set(cuts)) + [len(stream)]:
        dec.feed(stream[prev:c])
        prev = max(prev, c)
        while (r := dec.poll()) is not None:
            got.append(r)
    return got


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_chunks(wal_sample, data):
    """Fed in random chunk sizes, from a random record, the decoder yields exactly the same records."""
    recs = all_records(wal_sample)
    # a window around the biggest record: page, multi-page and (PG15 sample) segment crossings
    big = max(range(len(recs)), key=lambda i: recs[i].tot_len)
    i = data.draw(st.integers(max(0, big - 300), big), label="first record")
    j = min(len(recs), big + 300)
    start, end = recs[i].lsn, recs[j - 1].end_lsn
    stream = wal_sample.read(start, end - start)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=80), label="cuts")
    dec = WalStreamDecoder(start, wal_sample.seg_size)
    assert _feed_in_chunks(dec, stream, cuts) == recs[i:j]
    assert dec.last_record_end == end


def test_byte_at_a_time(wal_sample):
    recs = all_records(wal_sample)
    i = next(k for k, r in enumerate(recs) if r.tot_len > 20_000 and r.lsn > wal_sample.start_lsn + 20_000)
    first = next(k for k in range(i, 0, -1) if recs[i].lsn - recs[k].lsn > 10_000)
    start, end = recs[first].lsn, recs[i].end_lsn
    dec = WalStreamDecoder(start, wal_sample.seg_size)
    stream = wal_sample.read(start, end - start)
    assert _feed_in_chunks(dec, stream, list(range(len(stream)))) == recs[first:i + 1]


# -- find_end_of_wal ----------------------------------------------------------


def test_find_end_of_wal_whole(wal_sample):
    recs = all_records(wal_sample)
    assert find_end_of_wal(wal_sample.read, wal_sample.start_lsn, 1 << 62, wal_sample.seg_size) == recs[-1].end_lsn
    mid = recs[len(recs) // 2]
    assert find_end_of_wal(wal_sample.read, mid.lsn, 1 << 62, wal_sample.seg_size) == recs[-1].end_lsn


def _reader(sample, cut: int | None = None, zero_from: int | None = None, flip: int | None = None):
    def read(lsn: int, n: int) -> bytes:
        if cut is not None:
            n = max(0, min(n, cut - lsn))
        b = bytearray(sample.read(lsn, n))
        if zero_from is not None and lsn + len(b) > zero_from:
            k = max(0, zero_from - lsn)
            b[k:] = bytes(len(b) - k)
        if flip is not None and lsn <= flip < lsn + len(b):
            b[flip - lsn] ^= 0x10
        return bytes(b)
    return read


def _end_before(recs, lsn: int) -> int:
    """End of the last record that ends by lsn."""
    return max(r.end_lsn for r in recs if r.end_lsn <= lsn)


def test_find_end_of_wal_torn_tails(wal_sample):
    recs = all_records(wal_sample)
    seg = wal_sample.seg_size
    start = recs[len(recs) // 2].lsn
    tail = [r for r in recs if r.lsn > start + 100_000]
    big = max(tail, key=lambda r: r.tot_len)
    for r in (tail[5], big, tail[-1]):
        inside = r.lsn + r.tot_len // 2
        # a segment file that stops (truncated mid-record)
        assert find_end_of_wal(_reader(wal_sample, cut=inside), start, 1 << 62, seg) == recs[recs.index(r) - 1].end_lsn
        # zeros from the middle of the record on (a preallocated segment)
        prev_end = recs[recs.index(r) - 1].end_lsn
        assert find_end_of_wal(_reader(wal_sample, zero_from=inside), start, 1 << 62, seg) == prev_end
        # zeros right after a record
        assert find_end_of_wal(_reader(wal_sample, zero_from=r.lsn), start, 1 << 62, seg) == _end_before(recs, r.lsn)
        # a bit flip inside the record: its CRC fails
        assert find_end_of_wal(_reader(wal_sample, flip=r.lsn + r.tot_len - 1), start, 1 << 62, seg) == _end_before(
            recs, r.lsn
        )
        # upper bound in the middle of the record
        assert find_end_of_wal(wal_sample.read, start, inside, seg) == _end_before(recs, inside)


def test_truncated_real_segment(wal_sample, tmp_path):
    """A copy of the last segment cut short in the middle of a record, read from the file."""
    recs = all_records(wal_sample)
    seg = wal_sample.seg_size
    last_seg = (wal_sample.end_lsn - 1) // seg
    in_seg = [r for r in recs if r.lsn // seg == last_seg]
    cut_rec = in_seg[len(in_seg) // 2]
    path = tmp_path / "seg"
    path.write_bytes(wal_sample.read(last_seg * seg, cut_rec.lsn + 10 - last_seg * seg))

    def read(lsn, n):
        with open(path, "rb") as f:
            f.seek(lsn - last_seg * seg)
            return f.read(n)

    assert find_end_of_wal(read, in_seg[0].lsn, (last_seg + 1) * seg, seg) == _end_before(recs, cut_rec.lsn)


# -- errors and odd WAL (synthetic) -------------------------------------------


def test_stream_errors_after_good_records(wal_sample):
    recs = all_records(wal_sample)
    start = recs[10].lsn
    bad = recs[20]
    data = bytearray(wal_sample.read(start, recs[30].end_lsn - start))
    data[bad.lsn - start + 30] ^= 0xFF
    dec = WalStreamDecoder(start, wal_sample.seg_size)
    dec.feed(bytes(data))
    for want in recs[10:20]:
        assert dec.poll() == want
    with pytest.raises(WalDecodeError, match="CRC"):
        dec.poll()
    assert issubclass(WalDecodeError, CorruptData)
    assert dec.last_record_end == recs[19].end_lsn


def test_bad_page_headers(WalWriter):
    w = WalWriter(16 << 20)
    for i in range(200):
        w.append(21, 0, bytes([i % 251]) * 300)
    good = w.data()
    dec = WalStreamDecoder(16 << 20)
    dec.feed(good)
    assert len(dec.drain()) == 200 and dec.pg_version == 18 and dec.system_id == 7

    def fails(mutate, msg):
        b = bytearray(good)
        mutate(b)
        d = WalStreamDecoder(16 << 20)
        d.feed(bytes(b))
        with pytest.raises(WalDecodeError, match=msg):
            while d.poll() is not None:
                pass

    fails(lambda b: b.__setitem__(slice(0, 2), b"\x99\x99"), "page magic")
    fails(lambda b: b.__setitem__(slice(8192, 8194), struct.pack("<H", 0xD110)), "differs")
    fails(lambda b: b.__setitem__(slice(8192 + 8, 8192 + 16), struct.pack("<Q", 5 << 24)), "page address")
    fails(lambda b: b.__setitem__(slice(8192 + 2, 8192 + 4), b"\x00\x01"), "info bits")
    fails(lambda b: b.__setitem__(slice(8192 + 16, 8192 + 20), struct.pack("<I", 3)), "contrecord length")
    fails(lambda b: b.__setitem__(slice(2, 4), b"\x00\x00"), "long header")
    fails(lambda b: b.__setitem__(slice(32, 36), struct.pack("<I", 1 << 20)), "segment size")
    fails(lambda b: b.__setitem__(slice(40, 44), struct.pack("<I", 12)), "invalid record length")


def test_zero_length_means_no_more_records_yet(WalWriter):
    w = WalWriter(16 << 20)
    for _ in range(3):
        w.append(21, 0, b"x" * 100)
    dec = WalStreamDecoder(16 << 20)
    dec.feed(w.data() + bytes(4096))
    assert len(dec.drain()) == 3
    assert dec.poll() is None and dec.at_zeros
    # a zeroed page header at a page boundary is the same
    w.pad_to_page()
    dec = WalStreamDecoder(16 << 20)
    dec.feed(w.data() + bytes(8192))
    assert len(dec.drain()) == 3 and dec.at_zeros


def test_prev_link_checked(WalWriter):
    w = WalWriter(16 << 20)
    w.append(21, 0, b"a" * 50)
    w.prev = 12345  # the next record points somewhere else
    w.append(21, 0, b"b" * 50)
    dec = WalStreamDecoder(16 << 20)
    dec.feed(w.data())
    assert dec.poll() is not None
    with pytest.raises(WalDecodeError, match="prev-link"):
        dec.poll()


def test_overwritten_contrecord_is_skipped(WalWriter):
    """A record torn at a page boundary whose tail was replaced (XLP_FIRST_IS_OVERWRITE_CONTRECORD)."""
    w = WalWriter(16 << 20)
    a = w.append(21, 0, b"a" * 8000)
    room = 8192 - w.pos % 8192
    w.append(21, 0, b"b" * 5000, limit=room)  # torn: only its first page part exists
    assert w.pos % 8192 == 0
    w.next_page_flags = 0x0008
    c = w.append(0, 0xD0, struct.pack("<Qq", w.pos, 0))  # XLOG_OVERWRITE_CONTRECORD, prev-link to a
    dec = WalStreamDecoder(16 << 20)
    dec.feed(w.data())
    got = dec.drain()
    assert [r.lsn for r in got] == [a, c]


def test_records_across_segments_small_segments(WalWriter):
    """1 MiB segments, records of all sizes, some spanning several pages and segments."""
    seg = 1 << 20
    w = WalWriter(3 * seg, seg_size=seg)
    sizes = [30, 8000, 8170, 8192, 20_000, 3, 300_000, 100, 1_500_000, 7]
    for k in range(60):
        w.append(21, 0, bytes([k]) * sizes[k % len(sizes)])
    data = w.data()
    dec = WalStreamDecoder(3 * seg, seg)
    got = []
    for i in range(0, len(data), 65_537):
        dec.feed(data[i : i + 65_537])
        got += dec.drain()
    assert [r.lsn for r in got] == w.lsns
    assert [r.end_lsn for r in got] == w.ends
    assert find_end_of_wal(lambda lsn, n: data[lsn - 3 * seg : lsn - 3 * seg + n], 3 * seg, 1 << 40, seg) == w.ends[-1]


def test_start_must_be_aligned():
    with pytest.raises(ValueError):
        WalStreamDecoder(12)
    with pytest.raises(ValueError):
        WalStreamDecoder(0, seg_size=3 << 20)
