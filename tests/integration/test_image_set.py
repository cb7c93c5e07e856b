"""Data directory <-> image layers: exact round trip of a real cluster, key layout, refusals.

The cluster (PG 18 embedded and PG 15): initdb, test_redo_worker's history (table t), then
pgbench -i -s 1, a couple of tables (one empty), an unlogged table with an index, a second
database; stopped cleanly. Its image is
restored and compared file by file (bytes and modes) with the original, minus what image_set
deliberately skips; then the restored directory is given its WAL and started.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import tarfile
from pathlib import Path

import pytest
from test_redo_worker import PRIMARY_OPTIONS, Scratch, get_history, sql

from neonctl.engine.compute.controldata import read_control_data
from neonctl.engine.lsn import WAL_SEGMENT_SIZE, segment_file_name
from neonctl.engine.pageserver.images.create import create_image
from neonctl.engine.pageserver.images.image_set import AUX_FILES_KEY, IMAGE_META_KEY
from neonctl.engine.pageserver.images.materialize import prepare_for_recovery
from neonctl.engine.pageserver.images.restore import (
    image_info_from_layers,
    read_image_meta,
    restore_image,
)
from neonctl.engine.pageserver.key import (
    MAX_KEY,
    MIN_KEY,
    SlruKind,
    controlfile_key,
    rel_size_key,
    relmap_key,
    slru_seg_size_key,
)
from neonctl.engine.pageserver.storage_layer.image_layer import ImageLayerReader
from neonctl.engine.wal.reader import find_end_of_wal
from neonctl.errors import CorruptData, InvalidInput

TL = "0123456789abcdef0123456789abcdef"
PARTITION = 4 << 20  # small, so the ~25 MB cluster spans several layers

SKIPPED_DIR_CONTENTS = ("pg_wal", "pg_replslot", "pg_stat_tmp", "pg_subtrans", "pg_dynshmem", "pg_notify",
                        "pg_serial", "pg_snapshots")


class Cluster:
    def __init__(self, rt, scratch: Scratch, pgdata: Path, unlogged: set[str], empty_rel: str, dbs: dict[str, int]):
        self.rt, self.scratch, self.pgdata, self.unlogged, self.empty_rel, self.dbs = (
            rt, scratch, pgdata, unlogged, empty_rel, dbs)


@pytest.fixture(scope="module", params=["pg18", "pg15"])
def cluster(request):
    """test_redo_worker's primary (initdb + its history), populated further; stopped cleanly."""
    h = get_history(request.param)
    rt, scratch, pgdata = h.rt, h.scratch, h.primary
    port = scratch.start(pgdata, PRIMARY_OPTIONS)
    try:
        rt.run([rt.bin("pgbench"), "-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                "postgres"])
        for stmt in ("CREATE TABLE a (id int PRIMARY KEY, t text)",
                     "INSERT INTO a SELECT g, md5(g::text) FROM generate_series(1, 10000) g",
                     "CREATE TABLE empty_t (x int)",
                     "CREATE UNLOGGED TABLE u (id int PRIMARY KEY, v text)",
                     "INSERT INTO u SELECT g, repeat('u', 50) FROM generate_series(1, 5000) g",
                     "VACUUM a", "VACUUM u", "CREATE DATABASE db2"):
            sql(port, stmt)
        for stmt in ("CREATE TABLE b (x int)", "INSERT INTO b SELECT generate_series(1, 1000)", "VACUUM b"):
            sql(port, stmt, db="db2")
        unlogged = {r[0] for r in sql(port, "SELECT pg_relation_filepath(oid) FROM pg_class"
                                            " WHERE relpersistence = 'u' AND pg_relation_filepath(oid) IS NOT NULL")}
        assert len(unlogged) >= 2  # u, its primary key (and its toast table and index)
        empty_rel = sql(port, "SELECT pg_relation_filepath('empty_t')")[0][0]
        dbs = dict(sql(port, "SELECT datname, oid::int FROM pg_database"))
        sql(port, "CHECKPOINT")
    finally:
        scratch.stop(pgdata)
    yield Cluster(rt, scratch, pgdata, unlogged, empty_rel, dbs)


@pytest.fixture(scope="module")
def image(cluster):
    cd = read_control_data(cluster.rt.bin_dir, cluster.pgdata)
    assert cd.state == "shut down"
    layers = cluster.scratch.root / "image-set-layers"
    info = create_image(cluster.pgdata, layers, TL, cd.checkpoint_lsn, cd.checkpoint_lsn, cd.redo_lsn,
                        partition_size=PARTITION)
    yield info
    shutil.rmtree(layers)


def _tree(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", oct(st.st_mode & 0o7777))
            else:
                out[rel] = ("file", oct(st.st_mode & 0o7777), hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _expected_skip(rel: str, kind: str, unlogged: set[str]) -> bool:
    parts = rel.split("/")
    if any(p.startswith("pgsql_tmp") for p in parts):  # temporary files and their directories
        return True
    if parts[0] in SKIPPED_DIR_CONTENTS and len(parts) > 1:
        return kind != "dir" or parts[0] != "pg_wal"  # pg_wal keeps archive_status (and summaries)
    if kind == "dir":
        return False
    if rel in ("postmaster.opts", "postmaster.pid") or parts[-1] == "pg_internal.init":
        return True
    base = rel.split(".")[0]
    return any(base in (u, u + "_fsm", u + "_vm") for u in unlogged)


def test_round_trip_is_byte_exact_except_deliberate_skips(cluster, image):
    orig = _tree(cluster.pgdata)
    target = cluster.scratch.dir("restored") / "pgdata"
    meta = restore_image(image.paths, target)
    assert meta["lsn"] == image.lsn and meta["cluster_state"] == "shut down"
    restored = _tree(target)
    expected = {k: v for k, v in orig.items() if not _expected_skip(k, v[0], cluster.unlogged)}
    skipped = sorted(set(orig) - set(expected))
    assert any(s.endswith(tuple(cluster.unlogged)) for s in skipped)  # the unlogged main forks were there
    assert any(s.startswith("pg_wal/0000") for s in skipped)
    assert sorted(set(restored) - set(expected)) == []
    assert sorted(set(expected) - set(restored)) == []
    diff = [k for k in expected if expected[k] != restored[k]]
    assert diff == []
    for u in cluster.unlogged:
        assert (target / (u + "_init")).exists() and not (target / u).exists()
    assert os.stat(target).st_mode & 0o777 == os.stat(cluster.pgdata).st_mode & 0o777 == 0o700

    # the restored directory is a working cluster once it gets its WAL and a backup_label
    def read_wal(lsn: int, n: int) -> bytes:
        out = bytearray()
        while n > 0:
            seg, off = divmod(lsn, WAL_SEGMENT_SIZE)
            k = min(n, WAL_SEGMENT_SIZE - off)
            with open(cluster.pgdata / "pg_wal" / segment_file_name(seg), "rb") as f:
                f.seek(off)
                out += f.read(k)
            lsn, n = lsn + k, n - k
        return bytes(out)

    seg_end = (image.checkpoint_lsn // WAL_SEGMENT_SIZE + 1) * WAL_SEGMENT_SIZE
    end = find_end_of_wal(read_wal, image.checkpoint_lsn, seg_end)
    assert end > image.checkpoint_lsn
    prepare_for_recovery(target, read_wal, end, image.checkpoint_lsn, image.redo_lsn, "pg_rewind", "round trip")
    port = cluster.scratch.start(target)
    try:
        assert sql(port, "SELECT count(*) FROM pgbench_accounts")[0][0] == 100000
        assert sql(port, "SELECT count(*), sum(length(t)) FROM a")[0] == (10000, 320000)
        assert sql(port, "SELECT count(*) FROM u")[0][0] == 0  # unlogged: reset by recovery, as always
        assert sql(port, "SELECT count(*) FROM b", db="db2")[0][0] == 1000
        sql(port, "INSERT INTO u VALUES (1, 'x')")
    finally:
        cluster.scratch.stop(target, "immediate")
    shutil.rmtree(target.parent)


def test_key_layout(cluster, image):
    info = image
    assert len(info.layers) >= 3
    assert info.key_ranges[0].start == MIN_KEY and info.key_ranges[-1].end == MAX_KEY
    for a, b in zip(info.key_ranges, info.key_ranges[1:], strict=False):
        assert a.end == b.start
    values: dict = {}
    for path in info.paths:
        with ImageLayerReader(path) as r:
            assert r.lsn == info.lsn
            size = 0
            for key, value in r.iter_all():
                assert r.key_range.contains(key)
                values[key] = value if not key.is_rel_block() and not key.is_slru_block() else len(value)
                size += len(value)
            assert size <= PARTITION + 8192 or r.key_range.end == MAX_KEY
    assert info.raw_bytes > 20 << 20 and info.file_size < info.raw_bytes / 2  # zstd at work

    db = cluster.dbs["postgres"]
    rel = int(cluster.empty_rel.split("/")[-1])
    assert struct.unpack("<I", values[rel_size_key(1663, db, rel, 0)]) == (0,)  # an empty relation still exists
    accounts = [k for k in values if k.is_rel_size() and k.field3 == db]
    assert len(accounts) > 20
    blocks: dict = {}
    for b in values:
        if b.is_rel_block():
            blocks.setdefault(b.rel_tag(), []).append(b.field6)
    for k in accounts:  # every block below a fork's size is present, none above
        (n,) = struct.unpack("<I", values[k])
        assert sorted(blocks.get(k.rel_tag(), [])) == list(range(n))
    assert set(blocks) <= {k.rel_tag() for k in values if k.is_rel_size()}
    for name, oid in cluster.dbs.items():
        assert values[relmap_key(1663, oid)] == (cluster.pgdata / f"base/{oid}/pg_filenode.map").read_bytes(), name
    assert values[relmap_key(1664, 0)] == (cluster.pgdata / "global/pg_filenode.map").read_bytes()
    assert any(k.is_rel_size() and k.field2 == 1664 and k.field3 == 0 for k in values)  # global catalogs
    assert struct.unpack("<I", values[slru_seg_size_key(SlruKind.CLOG, 0)])[0] >= 1
    assert slru_seg_size_key(SlruKind.MULTIXACT_OFFSETS, 0) in values
    assert len(values[controlfile_key()]) == 8192
    assert values[controlfile_key()] == (cluster.pgdata / "global" / "pg_control").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(values[AUX_FILES_KEY])) as tar:
        names = {m.name: m for m in tar.getmembers()}
    assert names["PG_VERSION"].isfile() and names["postgresql.conf"].isfile()
    assert names["pg_wal/archive_status"].isdir() and names["pg_replslot"].isdir()
    assert names[f"base/{db}/PG_VERSION"].isfile()
    assert not any(
        n.startswith(("base/", "global/")) and n.split("/")[-1][0].isdigit() and m.isfile() for n, m in names.items()
    )
    assert "global/pg_control" not in names and "postmaster.opts" not in names
    assert b'"cluster_state": "shut down"' in values[IMAGE_META_KEY]


def test_image_info_from_layers_and_meta(image):
    again = image_info_from_layers(reversed(image.paths))
    assert (again.lsn, again.checkpoint_lsn, again.redo_lsn, again.cluster_state, again.timeline_id) == (
        image.lsn,
        image.checkpoint_lsn,
        image.redo_lsn,
        image.cluster_state,
        TL,
    )
    assert again.names == image.names
    moved = image.relocated("/elsewhere")
    assert moved.paths == [Path("/elsewhere", n) for n in image.names] and moved.lsn == image.lsn
    assert type(image).from_dict(image.to_dict()) == image
    assert read_image_meta(image.paths)["pg_version"] == image.pg_version


def test_refusals(cluster, image):
    root = cluster.scratch.dir("refusals")
    # an incomplete set of layers is not an image
    with pytest.raises(InvalidInput, match="contiguously|end"):
        restore_image(image.paths[:-1], root / "a")
    with pytest.raises(InvalidInput, match="contiguously"):
        restore_image(image.paths[1:], root / "a")
    # a non-empty target
    (root / "b").mkdir()
    (root / "b" / "x").write_text("x")
    with pytest.raises(InvalidInput, match="not empty"):
        restore_image(image.paths, root / "b")
    # a running (or crashed) cluster and wrong checkpoint LSNs
    fake = root / "fake"
    (fake / "global").mkdir(parents=True)
    (fake / "PG_VERSION").write_text("18\n")
    control = bytearray((cluster.pgdata / "global" / "pg_control").read_bytes())
    struct.pack_into("<i", control, 16, 6)  # DB_IN_PRODUCTION
    (fake / "global" / "pg_control").write_bytes(control)
    cd = read_control_data(cluster.rt.bin_dir, cluster.pgdata)
    with pytest.raises(InvalidInput, match="cluster state"):
        create_image(fake, root / "out", TL, cd.checkpoint_lsn, cd.checkpoint_lsn, cd.redo_lsn)
    with pytest.raises(InvalidInput, match="pg_control has checkpoint"):
        create_image(cluster.pgdata, root / "out", TL, cd.checkpoint_lsn + 8, cd.checkpoint_lsn + 8, cd.redo_lsn)
    (fake / "postmaster.pid").write_text("1\n")
    with pytest.raises(InvalidInput, match="postmaster.pid"):
        create_image(fake, root / "out", TL, 1, 1, 1)
    assert not (root / "out").exists() or not any((root / "out").iterdir())
    # a damaged layer is reported, not restored from
    bad = root / "bad"
    bad.mkdir()
    paths = []
    for p in image.paths:
        shutil.copy(p, bad / p.name)
        paths.append(bad / p.name)
    with open(paths[0], "r+b") as f:
        f.seek(8192 + 100)
        b = f.read(1)
        f.seek(8192 + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CorruptData):
        restore_image(paths, root / "c")
    shutil.rmtree(root)


def test_restore_into_a_recycled_directory_gives_the_same_tree(cluster, image):
    """A stopped compute's directory, with its own extra files, changed contents and odd entries, becomes
    exactly the tree a restore into an empty directory gives: files rewritten in place, the rest deleted."""
    fresh, old = cluster.scratch.dir("recycle-fresh") / "pgdata", cluster.scratch.dir("recycle-old") / "pgdata"
    restore_image(image.paths, fresh)
    restore_image(image.paths, old)
    inode_before = (old / "global" / "pg_control").stat().st_ino
    rels = sorted(p for p in old.rglob("*") if p.is_file() and p.stat().st_size >= 8192)
    with open(rels[0], "r+b") as f:  # a page changed by the old compute
        f.write(b"\xff" * 100)
    with open(rels[1], "ab") as f:  # a relation that grew
        f.write(bytes(8192 * 3))
    os.truncate(rels[2], 8192)  # one that shrank
    rels[3].unlink()  # one that is missing
    (old / "base" / "99999").mkdir()  # a database the image does not have
    (old / "base" / "99999" / "1259").write_bytes(b"x" * 8192)
    (old / "global" / "pg_internal.init").write_bytes(b"stale relcache")
    (old / "postmaster.pid").write_text("12345\n")
    (old / "pg_wal" / "000000010000000000000009").write_bytes(bytes(100))
    (old / "pg_wal" / "archive_status" / "000000010000000000000009.done").write_text("")
    (old / "stray-link").symlink_to("/etc")
    os.chmod(old / "base", 0o755)
    restore_image(image.paths, old, recycle=True)
    assert _tree(old) == _tree(fresh)
    assert (old / "global" / "pg_control").stat().st_ino == inode_before  # rewritten where it was
