"""Bulk image I/O writes and reads exactly what the per-key path did.

``write_image_layer`` must produce the bytes of ``ImageLayerWriter``; ``create_image`` (runs of
pages, partitions written in one call) the layers of the per-page loop it replaced, kept below
as the reference; ``restore_image`` (runs of pages, one write each) the original files. Checked
on synthetic data directories (small segments, incompressible pages inside runs, partitions cut
mid-run) and on a real cluster after initdb and after pgbench -i.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
import shutil
import stat
import struct
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_redo_worker import Scratch, runtime_for, sql

from neonctl.engine.compute.controldata import read_control_data
from neonctl.engine.pageserver.images import create as image_create
from neonctl.engine.pageserver.images.create import (
    _aux_tar,
    _partitions,
    _read_pages,
    _read_pg_control,
    _Run,
    _scan,
)
from neonctl.engine.pageserver.images.image_set import (
    AUX_FILES_KEY,
    BLCKSZ,
    FORMAT,
    IMAGE_META_KEY,
)
from neonctl.engine.pageserver.images.restore import restore_image
from neonctl.engine.pageserver.key import (
    KEY_SIZE,
    MAX_KEY,
    MIN_KEY,
    Key,
    KeyRange,
    controlfile_key,
    rel_block_key,
    rel_size_key,
    relmap_key,
    slru_block_key,
    slru_seg_size_key,
)
from neonctl.engine.pageserver.key_columns import key_fields, key_runs
from neonctl.engine.pageserver.storage_layer.image_layer import (
    ImageLayerReader,
    ImageLayerWriter,
    ImageValues,
    write_image_layer,
)
from neonctl.engine.pageserver.storage_layer.layer_name import ImageLayerName
from neonctl.errors import CorruptData, InvalidInput

TL = "0123456789abcdef0123456789abcdef"


def value(rng: random.Random, kind: str) -> bytes:
    if kind == "zero":
        return bytes(BLCKSZ)
    if kind == "random":
        return rng.randbytes(BLCKSZ)
    if kind == "heap":  # header, free space, tuples: compresses
        return rng.randbytes(24) + bytes(BLCKSZ - 324) + rng.randbytes(300)
    if kind == "text":
        return (b"%d,abc," % rng.randrange(10**6) * 2000)[:BLCKSZ]
    if kind == "big":  # beyond zstd's 128 KiB block
        return rng.randbytes(50) * 4000 + rng.randbytes(rng.randrange(1000))
    return rng.randbytes(rng.choice([0, 1, 9, 10, 11, 12, 127, 128, 129, rng.randrange(400)]))


# -- the bulk writer and reader -------------------------------------------------------------------


values_strategy = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 2), st.integers(0, 300),
              st.sampled_from(["zero", "random", "heap", "text", "small", "small", "big"]), st.integers()),
    max_size=120, unique_by=lambda t: t[:3])


@settings(max_examples=40, deadline=None)
@given(values_strategy, st.booleans())
def test_bulk_writer_writes_the_streaming_bytes(rows: list, whole_space: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        bulk_equals_streaming(Path(d), rows, whole_space)


def bulk_equals_streaming(tmp_path: Path, rows: list, whole_space: bool) -> None:
    items = sorted((Key(0, 1663, 5 + db, 16384 + rel, 0, blk), value(random.Random(seed), kind))
                   for db, rel, blk, kind, seed in rows)
    key_range = KeyRange(MIN_KEY, MAX_KEY) if whole_space or not items else \
        KeyRange(items[0][0], items[-1][0].next())
    lsn = 0x169B7F8
    with ImageLayerWriter(tmp_path / "stream", TL, key_range, lsn) as w:
        for k, v in items:
            w.put(k, v)
        stream = w.finish()
    keys = np.frombuffer(b"".join(k.to_bytes() for k, _ in items), dtype=np.uint8).reshape(-1, KEY_SIZE)
    length = np.array([len(v) for _, v in items], dtype=np.int64)
    buf = np.frombuffer(b"".join(v for _, v in items) or b"\0", dtype=np.uint8)
    bulk = write_image_layer(tmp_path / "bulk", TL, key_range, lsn, ImageValues(keys, buf, np.cumsum(length) - length,
                                                                                length))
    assert (tmp_path / "bulk").read_bytes() == (tmp_path / "stream").read_bytes()
    assert (bulk.name, bulk.file_size, bulk.num_values, bulk.timeline_id) == \
        (stream.name, stream.file_size, stream.num_values, stream.timeline_id)
    assert sorted(os.listdir(tmp_path)) == ["bulk", "stream"]
    with ImageLayerReader(tmp_path / "bulk") as r:
        back = r.read_all()
        assert back.keys.tobytes() == keys.tobytes()
        assert [back.value(i) for i in range(len(back))] == [v for _, v in items]
        again = r.read_all(scratch_name="test")
        assert again.buf.tobytes() == back.buf.tobytes() and again.off.tolist() == back.off.tolist()


@pytest.mark.parametrize("values", [[b""], [b"", b""], [b"", bytes(BLCKSZ), b"", b"x"]])
def test_bulk_writer_empty_values(tmp_path: Path, values: list[bytes]) -> None:
    items = [(rel_block_key(1663, 5, 16384, 0, b), v) for b, v in enumerate(values)]
    with ImageLayerWriter(tmp_path / "stream", TL, KeyRange(MIN_KEY, MAX_KEY), 0x10) as w:
        for k, v in items:
            w.put(k, v)
        w.finish()
    length = np.array([len(v) for v in values], dtype=np.int64)
    keys = np.frombuffer(b"".join(k.to_bytes() for k, _ in items), dtype=np.uint8).reshape(-1, KEY_SIZE)
    write_image_layer(tmp_path / "bulk", TL, KeyRange(MIN_KEY, MAX_KEY), 0x10,
                      ImageValues(keys, np.frombuffer(b"".join(values) + b"\0", dtype=np.uint8),
                                  np.cumsum(length) - length, length))
    assert (tmp_path / "bulk").read_bytes() == (tmp_path / "stream").read_bytes()
    back = _read_all(tmp_path / "bulk")
    assert [back.value(i) for i in range(len(back))] == values


def test_bulk_writer_refuses_keys_outside_its_range(tmp_path: Path) -> None:
    keys = np.frombuffer(rel_block_key(1663, 5, 16384, 0, 7).to_bytes(), dtype=np.uint8).reshape(1, KEY_SIZE)
    vals = ImageValues(keys, np.zeros(8, np.uint8), np.zeros(1, np.int64), np.full(1, 8, np.int64))
    narrow = KeyRange(MIN_KEY, rel_block_key(1663, 5, 16384, 0, 7))
    with pytest.raises(ValueError, match="outside"):
        write_image_layer(tmp_path / "l", TL, narrow, 0x10, vals)
    twice = ImageValues(np.repeat(keys, 2, axis=0), np.zeros(8, np.uint8), np.zeros(2, np.int64), np.full(2, 4))
    with pytest.raises(ValueError, match="duplicate"):
        write_image_layer(tmp_path / "l", TL, KeyRange(MIN_KEY, MAX_KEY), 0x10, twice)
    assert os.listdir(tmp_path) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(0, 2**32 - 1), st.integers(0, 255),
                          st.integers(0, 2**32 - 2000), st.integers(0, 40)), max_size=20))
def test_key_runs_and_fields(runs: list) -> None:
    firsts = [Key(f1, f2, 7, f2 % 1000, f5, f6) for f1, f2, f5, f6, _ in runs]
    counts = [n for *_, n in runs]
    rows = key_runs(np.frombuffer(b"".join(k.to_bytes() for k in firsts), dtype=np.uint8), np.array(counts))
    expected = [Key(*k[:5], k.field6 + j) for k, n in zip(firsts, counts, strict=True) for j in range(n)]
    assert rows.tobytes() == b"".join(k.to_bytes() for k in expected)
    assert [tuple(map(int, f)) for f in zip(*key_fields(rows), strict=True)] == [tuple(k) for k in expected]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40), st.integers(0, 30000)), max_size=40),
       st.integers(1, 200_000))
def test_partitions_cut_where_the_value_stream_did(spec: list, partition_size: int) -> None:
    runs = [_Run(Key(0, 1663, 5, 16384 + i, 0, 0), n, path=Path("seg")) if pages else
            _Run(Key(0, 1663, 5, 16384 + i, 0, 0xFFFFFFFF), 1, data=bytes(size))
            for i, (pages, n, size) in enumerate(spec)]
    boundaries, acc = [], 0  # the old loop: value by value
    for run in runs:
        for i in range(run.count):
            if acc >= partition_size:
                boundaries.append(run.key(i))
                acc = 0
            acc += run.value_size
    parts = _partitions(runs, partition_size)
    assert [run.key(i) for run, i, _ in (p[0] for p in parts[1:])] == boundaries
    assert all(n > 0 for p in parts for _, _, n in p) and all(parts[1:])
    covered = [(run.first, i + j) for p in parts for run, i, n in p for j in range(n)]
    assert covered == [(run.first, i) for run in runs for i in range(run.count)]


def test_read_pages_notices_a_file_that_shrank(tmp_path: Path) -> None:
    (tmp_path / "seg").write_bytes(bytes(3 * BLCKSZ))
    out = np.empty(4 * BLCKSZ, np.uint8)
    with pytest.raises(InvalidInput, match="changed while it was imaged"):
        _read_pages(tmp_path / "seg", 0, out)
    _read_pages(tmp_path / "seg", 1, out[:2 * BLCKSZ])


# -- create_image and restore_image ---------------------------------------------------------------


def reference_create_image(pgdata: Path, out_dir: Path, timeline_id: str, lsn: int, checkpoint_lsn: int,
                           redo_lsn: int, partition_size: int, relseg_size: int) -> list[Path]:
    """create_image as it was before the bulk path: every value through ImageLayerWriter.put."""
    state, _, _ = _read_pg_control(pgdata / "global" / "pg_control")
    scan = _scan(pgdata, relseg_size)
    meta = {"format": FORMAT, "timeline_id": timeline_id, "lsn": lsn, "checkpoint_lsn": checkpoint_lsn,
            "redo_lsn": redo_lsn, "pg_version": int((pgdata / "PG_VERSION").read_text().strip().split(".")[0]),
            "cluster_state": state, "blcksz": BLCKSZ, "relseg_size": relseg_size,
            "dir_mode": stat.S_IMODE(pgdata.stat().st_mode), "file_mode": stat.S_IMODE(scan.control.stat().st_mode),
            "empty_segments": scan.empty_segments}
    u32 = struct.Struct("<I")

    def items():
        by_db: dict = {}
        for spc, db, rel, fork in scan.forks:
            by_db.setdefault((spc, db), []).append((rel, fork))
        for loc in sorted(set(by_db) | set(scan.relmaps)):
            if loc in scan.relmaps:
                yield relmap_key(*loc), scan.relmaps[loc].read_bytes()
            for rel, fork in sorted(by_db.get(loc, [])):
                nblocks = 0
                for segno, path, n in scan.forks[(*loc, rel, fork)]:
                    data = path.read_bytes()
                    for i in range(n):
                        yield rel_block_key(*loc, rel, fork, segno * relseg_size + i), data[i * BLCKSZ:(i + 1) * BLCKSZ]
                    nblocks += n
                yield rel_size_key(*loc, rel, fork), u32.pack(nblocks)
        for (kind, segno), (path, n) in sorted(scan.slru.items()):
            data = path.read_bytes()
            for i in range(n):
                yield slru_block_key(kind, segno, i), data[i * BLCKSZ:(i + 1) * BLCKSZ]
            yield slru_seg_size_key(kind, segno), u32.pack(n)
        yield controlfile_key(), scan.control.read_bytes()
        yield IMAGE_META_KEY, json.dumps(meta, sort_keys=True).encode()
        yield AUX_FILES_KEY, _aux_tar(pgdata, scan)

    boundaries, acc = [], 0
    for key, v in items():
        if acc >= partition_size:
            boundaries.append(key)
            acc = 0
        acc += len(v)
    ranges = [KeyRange(a, b) for a, b in itertools.pairwise([MIN_KEY, *boundaries, MAX_KEY])]
    out_dir.mkdir(parents=True)
    paths, part = [], 0
    writer = ImageLayerWriter(out_dir / str(ImageLayerName(ranges[0], lsn)), timeline_id, ranges[0], lsn)
    for key, v in items():
        while not ranges[part].contains(key):
            paths.append(writer.finish().path)
            part += 1
            writer = ImageLayerWriter(out_dir / str(ImageLayerName(ranges[part], lsn)), timeline_id, ranges[part], lsn)
        writer.put(key, v)
    paths.append(writer.finish().path)
    return paths


def assert_same_image(pgdata: Path, work: Path, lsn: int, checkpoint: int, redo: int, partition_size: int,
                      relseg_size: int = image_create.RELSEG_SIZE) -> list[Path]:
    new = image_create.create_image(pgdata, work / "new", TL, lsn, checkpoint, redo, partition_size=partition_size,
                                    relseg_size=relseg_size)
    old = reference_create_image(pgdata, work / "old", TL, lsn, checkpoint, redo, partition_size, relseg_size)
    assert [p.name for p in new.paths] == [p.name for p in old]
    for a, b in zip(new.paths, old, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert [layer.file_size for layer in new.layers] == [p.stat().st_size for p in old]
    with ImageLayerReader(new.paths[0]) as r:
        assert r.lsn == lsn
    assert new.raw_bytes == sum(int(r.length.sum()) for r in map(_read_all, new.paths))
    assert sorted(os.listdir(work / "new")) == sorted(p.name for p in new.paths)
    return new.paths


def _read_all(path: Path) -> ImageValues:
    with ImageLayerReader(path) as r:
        return r.read_all()


def tree(root: Path, skip=lambda rel: False) -> dict[str, tuple]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if skip(rel):
                continue
            mode = oct(p.lstat().st_mode & 0o7777)
            out[rel] = ("dir", mode) if p.is_dir() else ("file", mode, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def synthetic_pgdata(root: Path, seed: int) -> tuple[int, int]:
    """A data directory with just what an image holds (no Postgres): segments of 5 pages, every kind
    of page; returns (checkpoint, redo)."""
    rng = random.Random(seed)
    kinds = ["zero", "random", "heap", "text"]

    def put(rel: str, data: bytes, mode: int = 0o600) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        p.write_bytes(data)
        os.chmod(p, mode)

    def pages(n: int) -> bytes:
        mix = rng.choice([kinds, ["random"], ["zero", "random"]])
        return b"".join(value(rng, rng.choice(mix)) for _ in range(n))

    root.mkdir(mode=0o700)
    checkpoint, redo = 0x3000028, 0x3000028 - rng.randrange(0, 0x1000)
    control = bytearray(rng.randbytes(BLCKSZ))
    struct.pack_into("<iiQQQ", control, 16, 1, 0, 0, checkpoint, redo)  # state "shut down", checkpoint, redo
    put("PG_VERSION", b"18\n")
    put("postgresql.conf", b"shared_buffers = 1MB\n" * rng.randrange(1, 50))
    put("global/pg_control", bytes(control))
    put("global/pg_filenode.map", rng.randbytes(512))
    put("global/1262", pages(2))
    for db in (1, 5):
        put(f"base/{db}/PG_VERSION", b"18\n")
        put(f"base/{db}/pg_filenode.map", rng.randbytes(512))
        for rel in range(16384, 16384 + rng.randrange(2, 6)):
            n = rng.choice([0, 1, 4, 5, 6, 12, 15, 23])
            for segno in range(max(1, -(-n // 5))):
                put(f"base/{db}/{rel}" + (f".{segno}" if segno else ""), pages(min(5, n - segno * 5)))
            if n:
                put(f"base/{db}/{rel}_fsm", pages(rng.randrange(1, 4)))
            if n == 5 and rng.random() < 0.5:
                put(f"base/{db}/{rel}.1", b"")  # left behind by a truncation
    put("base/5/17000_init", pages(1))  # an unlogged relation: only its init fork is kept
    put("base/5/17000", pages(3))
    put("pg_xact/0000", pages(3))
    put("pg_multixact/offsets/0000", pages(1))
    put("pg_multixact/members/0000", pages(1))
    put("pg_wal/000000010000000000000003", bytes(1000))
    (root / "pg_wal" / "archive_status").mkdir(mode=0o700)
    put("pg_stat/pgstat.stat", rng.randbytes(300), 0o640)
    return checkpoint, redo


def handmade_image(out: Path, pages: dict[int, bytes], split: int) -> list[Path]:
    """An image of one relation (segments of 4 pages) with the given blocks, in two layers split at block ``split``."""
    meta = {"format": FORMAT, "timeline_id": TL, "lsn": 0x100, "checkpoint_lsn": 0x100, "redo_lsn": 0x100,
            "pg_version": 18, "cluster_state": "shut down", "blcksz": BLCKSZ, "relseg_size": 4, "dir_mode": 0o700,
            "file_mode": 0o600, "empty_segments": []}
    aux = io.BytesIO()
    with tarfile.open(fileobj=aux, mode="w") as tar:
        for d in ("base", "base/5"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o700
            tar.addfile(info)
    items = [(rel_block_key(1663, 5, 16384, 0, b), v) for b, v in sorted(pages.items())]
    items += [(rel_size_key(1663, 5, 16384, 0), struct.pack("<I", max(pages) + 1)),
              (IMAGE_META_KEY, json.dumps(meta).encode()), (AUX_FILES_KEY, aux.getvalue())]
    cut = rel_block_key(1663, 5, 16384, 0, split)
    paths = []
    for key_range in (KeyRange(MIN_KEY, cut), KeyRange(cut, MAX_KEY)):
        with ImageLayerWriter(out / str(ImageLayerName(key_range, 0x100)), TL, key_range, 0x100) as w:
            for k, v in items:
                if key_range.contains(k):
                    w.put(k, v)
            paths.append(w.finish().path)
    return paths


def test_restore_puts_pages_at_their_block_numbers(tmp_path: Path) -> None:
    rng = random.Random(3)
    p = {b: value(rng, kind) for b, kind in [(0, "random"), (1, "heap"), (3, "text"), (4, "random"), (6, "zero")]}
    restore_image(handmade_image(tmp_path, p, split=1), tmp_path / "r")
    assert (tmp_path / "r/base/5/16384").read_bytes() == p[0] + p[1] + bytes(BLCKSZ) + p[3]  # a hole at block 2
    assert (tmp_path / "r/base/5/16384.1").read_bytes() == p[4] + bytes(BLCKSZ) + p[6]
    (tmp_path / "short").mkdir()
    short = handmade_image(tmp_path / "short", {0: bytes(BLCKSZ), 1: b"x" * 100}, split=1)
    with pytest.raises(CorruptData, match="is 100 bytes"):
        restore_image(short, tmp_path / "s")


@pytest.mark.parametrize("seed", range(4))
def test_synthetic_directory_round_trip(tmp_path: Path, seed: int) -> None:
    pgdata = tmp_path / "pgdata"
    checkpoint, redo = synthetic_pgdata(pgdata, seed)
    for i, partition_size in enumerate([1, 3 * BLCKSZ + 100, 7 * BLCKSZ, 64 << 20]):
        paths = assert_same_image(pgdata, tmp_path / f"w{i}", checkpoint, checkpoint, redo, partition_size,
                                  relseg_size=5)
        restore_image(paths, tmp_path / f"restored{i}")
        skipped = {"pg_wal/000000010000000000000003", "base/5/17000"}
        assert tree(tmp_path / f"restored{i}") == tree(pgdata, skip=skipped.__contains__)
        assert os.stat(tmp_path / f"restored{i}").st_mode & 0o777 == 0o700
        shutil.rmtree(tmp_path / f"w{i}")


def test_real_cluster_initdb_and_pgbench() -> None:
    rt = runtime_for("pg18")
    scratch = Scratch(rt)
    try:
        pgdata = scratch.new_cluster("bulk")

        def check(label: str) -> None:
            cd = read_control_data(rt.bin_dir, pgdata)
            work = scratch.dir(label)
            for partition_size in (4 << 20, image_create.DEFAULT_PARTITION_SIZE):
                assert_same_image(pgdata, work / str(partition_size), cd.checkpoint_lsn, cd.checkpoint_lsn,
                                  cd.redo_lsn, partition_size)

        check("initdb")
        port = scratch.start(pgdata)
        rt.run([rt.bin("pgbench"), "-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                "postgres"])
        sql(port, "CREATE TABLE noise AS SELECT g, md5(random()::text) || md5(random()::text) AS r"
                  " FROM generate_series(1, 20000) g")
        scratch.stop(pgdata)
        check("pgbench")
    finally:
        scratch.close()
