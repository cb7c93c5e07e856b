"""decode_record and the record helpers, checked record by record against pg_waldump -b."""

from __future__ import annotations

import re
import struct
from datetime import UTC, datetime

import pytest

from neonctl.engine.lsn import parse_lsn
from neonctl.engine.wal import decoder as wd
from neonctl.engine.wal import page_image as img
from neonctl.engine.wal import rmgr_records as rr
from neonctl.engine.wal.decoder import decode_record
from neonctl.engine.wal.reader import RawRecord, WalDecodeError, WalStreamDecoder

_decoded: dict[int, list] = {}


def decoded(sample) -> list[wd.DecodedRecord]:
    key = id(sample)
    if key not in _decoded:
        dec = WalStreamDecoder(sample.start_lsn, sample.seg_size)
        dec.feed(sample.read(sample.start_lsn, sample.end_lsn - sample.start_lsn))
        raws = dec.drain()
        assert dec.pg_version == sample.version
        _decoded[key] = [decode_record(r, dec.pg_version) for r in raws]
    return _decoded[key]


def pairs(sample):
    recs = decoded(sample)
    dump = sample.waldump
    assert [r.lsn for r in recs] == [d.lsn for d in dump]
    return list(zip(recs, dump, strict=False))


def test_records_and_blocks_match_pg_waldump(wal_sample):
    for r, d in pairs(wal_sample):
        assert (r.rmgr, r.tot_len, r.xid, r.prev) == (d.rmgr, d.tot_len, d.xid, d.prev), d
        assert r.tot_len - r.fpi_len == d.rec_len, d
        name = r.identify()
        if name is not None:
            assert d.desc.split(" ")[0] == name, d
        assert len(r.blocks) == len(d.blocks), d
        for b, db in zip(r.blocks, d.blocks, strict=False):
            assert (b.block_id, b.spc, b.db, b.rel, b.fork, b.blkno) == (
                db.block_id, db.spc, db.db, db.rel, db.fork, db.blkno), d
            assert b.has_image == db.fpi, d
            if b.has_image:
                assert (b.apply_image, b.hole_offset, b.hole_length, b.compression) == (
                    db.apply, db.hole_offset, db.hole_length, db.method), d


def test_identify_covers_common_rmgrs(wal_sample):
    known = {r.rmgr for r, _ in pairs(wal_sample) if r.identify() is not None}
    assert {"XLOG", "Transaction", "Storage", "Database", "Heap", "Heap2", "Btree", "Standby", "RelMap"} <= known


def _check_page(page: bytes, blk: wd.BlockRef) -> None:
    assert len(page) == img.BLCKSZ
    lower, upper, special, size_version = struct.unpack_from("<HHHH", page, 12)
    if blk.hole_length:
        # a standard page: the hole is exactly the free space between pd_lower and pd_upper
        assert (blk.hole_offset, blk.hole_offset + blk.hole_length) == (lower, upper)
        assert page[lower:upper] == bytes(upper - lower)
    if page != bytes(img.BLCKSZ):
        assert size_version == img.BLCKSZ | 4 and lower <= upper <= special <= img.BLCKSZ


def test_page_images_restore(wal_sample):
    methods = {}
    for r, _ in pairs(wal_sample):
        for b in r.blocks:
            if b.has_image:
                page = b.image
                _check_page(page, b)
                pd_lsn = struct.unpack_from("<II", page, 0)
                assert (pd_lsn[0] << 32 | pd_lsn[1]) < r.lsn
                methods[b.compression] = methods.get(b.compression, 0) + 1
                b._image = None  # keep memory down
    assert methods.get(None, 0) > 100 and methods.get("pglz", 0) > 100
    if wal_sample.version == 15:  # the Debian build has lz4 and zstd: the PG 15 sample uses them too
        assert methods.get("zstd", 0) > 10 and methods.get("lz4", 0) > 10


def test_pure_python_lz4_matches_package_or_pages(wal_pg15):
    """Only the PG 15 sample has lz4 images (the embedded PG 18 build lacks lz4)."""
    blocks = [b for r, _ in pairs(wal_pg15) for b in r.blocks if b.compression == "lz4"]
    assert blocks
    for b in blocks[:50]:
        raw = img._lz4_block_decompress(b.bimg, img.BLCKSZ - b.hole_length)
        assert raw == img.lz4_decompress(b.bimg, img.BLCKSZ - b.hole_length)


def _ts(text: str) -> datetime:
    m = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC", text)
    assert m, text
    return datetime.fromisoformat(m.group(1)).replace(tzinfo=UTC)


def _relpaths(rels: list[rr.RelFileLocator]) -> str:
    return " ".join(f"global/{x.rel}" if x.spc == 1664 else f"base/{x.db}/{x.rel}" for x in rels)


def test_xact_records(wal_sample):
    kinds = {}
    for r, d in pairs(wal_sample):
        x = rr.parse_xact(r, strict=True)
        if r.rmid != wd.RM_XACT_ID or x is None:
            assert x is None
            continue
        kinds[x.kind] = kinds.get(x.kind, 0) + 1
        assert d.desc.startswith(x.kind.upper())
        assert x.timestamp == _ts(d.desc), d
        if x.kind.endswith("_prepared"):
            assert d.desc.startswith(f"{x.kind.upper()} {x.xid}:"), d
            assert r.xid == 0 or r.xid != x.xid
        else:
            assert x.xid == r.xid
        m = re.search(r"; rels: ([^;]*)", d.desc)
        assert _relpaths(x.rels) == (m.group(1).strip() if m else ""), d
        m = re.search(r"; subxacts: ([\d ]*)", d.desc)
        assert x.subxacts == ([int(v) for v in m.group(1).split()] if m else []), d
    assert set(kinds) == {"commit", "abort", "commit_prepared", "abort_prepared"}
    assert kinds["commit"] > 300


def test_xact_needs_version_for_dropped_stats(wal_sample):
    with_stats = [r for r, _ in pairs(wal_sample)
                  if r.rmid == wd.RM_XACT_ID and r.info & 0x80
                  and struct.unpack_from("<I", r.main_data, 8)[0] & rr.XACT_XINFO_HAS_DROPPED_STATS]
    assert with_stats
    r = with_stats[0]
    r.pg_version = None
    with pytest.raises(ValueError, match="pg_version"):
        rr.parse_xact(r)
    other = 15 if wal_sample.version == 18 else 18
    with pytest.raises(WalDecodeError):  # the wrong layout does not go unnoticed
        for rec in with_stats:
            rr.parse_xact(rec, pg_version=other, strict=True)
    r.pg_version = wal_sample.version


_CP_RE = re.compile(
    r"redo (\S+); tli (\d+); prev tli (\d+); fpw (\w+);(?: wal_level (\w+);)? xid (\d+):(\d+); oid (\d+); "
    r"multi (\d+); offset (\d+); oldest xid (\d+) in DB (\d+); oldest multi (\d+) in DB (\d+); "
    r"oldest/newest commit timestamp xid: (\d+)/(\d+); oldest running xid (\d+); (shutdown|online)"
)


def test_checkpoints(wal_sample):
    seen = set()
    for r, d in pairs(wal_sample):
        cp = rr.parse_checkpoint(r)
        if not d.desc.startswith("CHECKPOINT_SHUTDOWN") and not d.desc.startswith("CHECKPOINT_ONLINE"):
            assert cp is None
            continue
        m = _CP_RE.search(d.desc)
        assert m, d.desc
        g = m.groups()
        assert cp.redo == parse_lsn(g[0])
        assert (cp.this_timeline, cp.prev_timeline, cp.full_page_writes) == (int(g[1]), int(g[2]), g[3] == "true")
        if wal_sample.version >= 17:
            assert cp.wal_level == ["minimal", "replica", "logical"].index(g[4])
        else:
            assert g[4] is None and cp.wal_level is None
        assert (cp.next_xid_epoch, cp.next_xid & 0xFFFFFFFF) == (int(g[5]), int(g[6]))
        assert (cp.next_oid, cp.next_multi, cp.next_multi_offset) == tuple(map(int, g[7:10]))
        assert (cp.oldest_xid, cp.oldest_xid_db, cp.oldest_multi, cp.oldest_multi_db) == tuple(map(int, g[10:14]))
        assert (cp.oldest_commit_ts_xid, cp.newest_commit_ts_xid, cp.oldest_active_xid) == tuple(map(int, g[14:17]))
        assert cp.shutdown == (g[17] == "shutdown")
        assert abs(cp.timestamp - datetime.now(UTC)).total_seconds() < 3600
        seen.add(g[17])
    assert seen == {"shutdown", "online"}


def test_storage_database_relmap_and_xlog(wal_sample):
    counts: dict[str, int] = {}
    for r, d in pairs(wal_sample):
        s = rr.parse_smgr(r)
        if isinstance(s, rr.SmgrCreate):
            assert d.desc == f"CREATE {_relpaths([s.rel])}" + ("" if s.forknum == 0 else f"_{wd.FORK_NAMES[s.forknum]}")
        elif isinstance(s, rr.SmgrTruncate):
            assert d.desc == f"TRUNCATE {_relpaths([s.rel])} to {s.blkno} blocks flags {s.flags}"
        db = rr.parse_dbase(r)
        if isinstance(db, rr.DbaseCreate) and db.strategy == "file_copy":
            assert d.desc == (f"CREATE_FILE_COPY copy dir {db.src_tablespace_id}/{db.src_db_id} "
                              f"to {db.tablespace_id}/{db.db_id}")
        elif isinstance(db, rr.DbaseCreate):
            assert d.desc == f"CREATE_WAL_LOG create dir {db.tablespace_id}/{db.db_id}"
        elif isinstance(db, rr.DbaseDrop):
            assert d.desc == "DROP dir " + " ".join(f"{t}/{db.db_id}" for t in db.tablespace_ids)
        rm = rr.parse_relmap(r)
        if rm is not None:
            assert d.desc.startswith(f"UPDATE database {rm.db_id} tablespace {rm.tablespace_id} size {len(rm.data)}")
        if r.is_switch:
            assert d.desc.startswith("SWITCH")
        if r.is_fpi:
            assert d.desc.split(" ")[0] in ("FPI", "FPI_FOR_HINT") and r.blocks and all(b.has_image for b in r.blocks)
        oid = rr.parse_nextoid(r)
        if oid is not None:
            assert d.desc == f"NEXTOID {oid}"
        for kind, obj in (("smgr", s), ("dbase", db), ("relmap", rm), ("switch", r.is_switch or None),
                          ("fpi", r.is_fpi or None), ("nextoid", oid)):
            if obj is not None:
                key = f"{kind}:{type(obj).__name__}:{getattr(obj, 'strategy', '')}"
                counts[key] = counts.get(key, 0) + 1
    assert set(counts) >= {
        "smgr:SmgrCreate:", "smgr:SmgrTruncate:", "dbase:DbaseCreate:file_copy", "dbase:DbaseCreate:wal_log",
        "dbase:DbaseDrop:", "relmap:RelmapUpdate:", "switch:bool:", "fpi:bool:", "nextoid:int:",
    }, counts


# -- synthetic ------------------------------------------------------------------


def _raw(body: bytes, rmid: int = 10, info: int = 0) -> RawRecord:
    hdr = struct.pack("<IIQBBxxI", 24 + len(body), 5, 0, info, rmid, 0)
    return RawRecord(1 << 24, (1 << 24) + 24 + len(body), hdr + body)


def test_block_header_forms():
    body = (
        bytes([253]) + struct.pack("<H", 7)  # origin
        + bytes([252]) + struct.pack("<I", 99)  # top-level xid
        + bytes([0, 0x20 | 0x40]) + struct.pack("<H", 3) + struct.pack("<IIII", 1663, 5, 16384, 12)
        + bytes([2, 0x80 | 0x20 | 2]) + struct.pack("<H", 2) + struct.pack("<I", 13)  # same rel, vm fork
        + bytes([255, 4])
        + b"abc" + b"xy" + b"main"
    )
    r = decode_record(_raw(body))
    assert (r.origin, r.toplevel_xid, r.main_data) == (7, 99, b"main")
    a, b = r.blocks
    assert (a.block_id, a.rel, a.blkno, a.fork, a.will_init, a.data) == (0, 16384, 12, "main", True, b"abc")
    assert a.image is None
    assert (b.block_id, b.rel, b.blkno, b.fork, b.will_init, b.data) == (2, 16384, 13, "vm", False, b"xy")
    assert r.rmgr == "Heap" and r.identify() == "INSERT"


def test_uncompressed_image_with_hole():
    page = bytearray(img.BLCKSZ)
    struct.pack_into("<HHHH", page, 12, 100, 8000, 8192, 0x2004)
    page[8000:] = b"t" * 192
    stored = bytes(page[:100] + page[8000:])
    body = (
        bytes([0, 0x10])
        + struct.pack("<H", 0)
        + struct.pack("<HHB", len(stored), 100, 0x01 | 0x02)
        + struct.pack("<IIII", 1663, 5, 1, 0)
        + stored
    )
    r = decode_record(_raw(body, rmid=0, info=0xB0))
    (b,) = r.blocks
    assert r.is_fpi and b.inits_page and b.image == bytes(page) and b.hole_length == 7900 and r.fpi_len == len(stored)


@pytest.mark.parametrize(
    "body, msg",
    [
        (bytes([40]), "invalid block_id"),
        (bytes([0, 0x20]) + struct.pack("<H", 0) + struct.pack("<IIII", 1, 2, 3, 4), "no data"),
        (bytes([0, 0x00]) + struct.pack("<H", 5) + struct.pack("<IIII", 1, 2, 3, 4), "HAS_DATA not set"),
        (bytes([0, 0x80]) + struct.pack("<H", 0) + struct.pack("<I", 4), "SAME_REL"),
        (bytes([1, 0]) + struct.pack("<H", 0) + struct.pack("<IIII", 1, 2, 3, 4) + bytes([0, 0]), "out-of-order"),
        (bytes([255, 10]) + b"abc", "payload"),
        (bytes([0, 0x10]) + struct.pack("<HHHB", 0, 100, 0, 0x01) + struct.pack("<IIII", 1, 2, 3, 4), "hole"),
    ],
)
def test_malformed_records(body, msg):
    with pytest.raises(WalDecodeError, match=msg):
        decode_record(_raw(body))


def test_pglz_literal_and_overlapping_match():
    # "abc" as literals, then a match of 10 bytes at distance 3, then literal "Z"
    src = bytes([0b0001000, *b"abc", 0x07, 0x03, *b"Z"])
    assert img.pglz_decompress(src, 14) == b"abcabcabcabcaZ"
    with pytest.raises(WalDecodeError):
        img.pglz_decompress(src, 15)
    with pytest.raises(WalDecodeError):
        img.pglz_decompress(bytes([0x01, 0x07, 0x09]), 10)  # match before any output


def test_lz4_block_fallback():
    # literals "abcd", match offset 4 length 4+4, then last literals "!"
    src = bytes([0x44, *b"abcd", 4, 0, 0x10, *b"!"])
    assert img._lz4_block_decompress(src, 13) == b"abcdabcdabcd!"
    with pytest.raises(WalDecodeError):
        img._lz4_block_decompress(src, 12)


def test_timestamptz():
    assert rr.timestamptz_to_datetime(0) == datetime(2000, 1, 1, tzinfo=UTC)
    assert rr.timestamptz_to_datetime(86_400_000_001) == datetime(2000, 1, 2, 0, 0, 0, 1, tzinfo=UTC)
    assert rr.timestamptz_to_datetime(2**63 - 1).year == 9999
