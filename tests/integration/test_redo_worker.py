"""Images made by the redo worker, end to end with real Postgres (PG 18 embedded and PG 15).

A cluster's history is built by driving a Timeline directly: initdb -> import, run Postgres on
the same directory recording (LSN, row count, checksum) after each commit, stop it, ingest its
WAL. Then: materialise at I, replay it as a standby (redo worker), image it, and materialise
computes from the image at later LSNs - they must hold exactly the data committed there and
replay from the image's redo point, not from initdb's.

The helpers here (scratch dirs, an initdb template per version, starting Postgres) are shared
with test_image_set.py.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from neonctl.engine.compute.controldata import read_control_data
from neonctl.engine.compute.endpoint import verify_replayed
from neonctl.engine.compute.runtime import PgRuntime, resolve_runtime, shared_dir
from neonctl.engine.lsn import (
    WAL_SEGMENT_SIZE,
    format_lsn,
    parse_lsn,
    segment_file_name,
)
from neonctl.engine.pageserver.images.create import create_image
from neonctl.engine.pageserver.images.image_set import ImageInfo
from neonctl.engine.pageserver.images.materialize import (
    materialize_from_image,
    prepare_for_recovery,
)
from neonctl.engine.pageserver.images.redo_worker import (
    SHUT_DOWN_IN_RECOVERY,
    RedoResult,
    replay_to,
)
from neonctl.engine.pageserver.timeline.timeline import Timeline
from neonctl.engine.ports import ephemeral_port
from neonctl.engine.process import pid_alive
from neonctl.errors import InvalidInput, PostgresError, Timeout

PG15_BIN = "/usr/lib/postgresql/15/bin"
# keep every WAL segment until it is ingested from pg_wal after the primary stops
PRIMARY_OPTIONS = "-c wal_keep_size=4GB"


# -- shared helpers -------------------------------------------------------------------------------


def runtime_for(name: str) -> PgRuntime:
    if name == "pg15":
        if not Path(PG15_BIN, "postgres").exists():
            pytest.fail(f"Debian PostgreSQL 15 is required at {PG15_BIN}")
        return resolve_runtime(PG15_BIN)
    return resolve_runtime(None)


class Scratch:
    """A directory the Postgres user can reach, and every Postgres started in it (stopped at close)."""

    def __init__(self, rt: PgRuntime):
        self.rt = rt
        self.root = Path(tempfile.mkdtemp(dir=shared_dir("test-scratch")))
        os.chmod(self.root, 0o755)
        self.running: dict[Path, int] = {}

    def dir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True)
        os.chmod(d, 0o755)
        return d

    def new_cluster(self, name: str) -> Path:
        pgdata = self.dir(name) / "pgdata"
        pgdata.mkdir(mode=0o700)
        self.rt.chown(pgdata.parent, recursive=True)
        self.rt.run([self.rt.bin("initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                     "--locale=C", "-N"])
        return pgdata

    def start(self, pgdata: Path, options: str = "") -> int:
        """Start Postgres on pgdata (log next to it); returns the port."""
        self.rt.chown(pgdata.parent, recursive=True)
        for _ in range(5):
            port = ephemeral_port()
            try:
                self.rt.run(
                    [
                        self.rt.bin("pg_ctl"),
                        "start",
                        "-w",
                        "-t",
                        "60",
                        "-D",
                        str(pgdata),
                        "-l",
                        str(pgdata.parent / "log"),
                        "-o",
                        f"-p {port} -c listen_addresses=127.0.0.1 -k {pgdata.parent} -c fsync=off {options}",
                    ]
                )
            except PostgresError:
                if "could not create any TCP/IP sockets" in self.log(pgdata):
                    continue
                raise PostgresError(f"Postgres failed to start: {self.log(pgdata)[-1500:]}") from None
            self.running[pgdata] = port
            return port
        raise PostgresError("no free port")

    def stop(self, pgdata: Path, mode: str = "fast") -> None:
        self.rt.run([self.rt.bin("pg_ctl"), "stop", "-w", "-m", mode, "-D", str(pgdata)])
        self.running.pop(pgdata, None)

    @staticmethod
    def log(pgdata: Path) -> str:
        try:
            return (pgdata.parent / "log").read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        for pgdata in list(self.running):
            try:
                self.stop(pgdata, "immediate")
            except PostgresError:
                pid = postmaster_pid(pgdata)
                if pid:
                    os.killpg(pid, 9)
        shutil.rmtree(self.root, ignore_errors=True)


def postmaster_pid(pgdata: Path) -> int | None:
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def sql(port: int, query: str, db: str = "postgres", options: str = ""):
    with psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", dbname=db, autocommit=True, connect_timeout=10, options=options
    ) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else None


def ingest_pg_wal(tl: Timeline, pgdata: Path) -> int:
    """Feed a stopped cluster's pg_wal to the timeline, from its last_record_lsn on."""
    start = tl.last_record_lsn
    segno = start // WAL_SEGMENT_SIZE
    data = bytearray()
    while (p := pgdata / "pg_wal" / segment_file_name(segno)).exists():
        seg = p.read_bytes()
        data += seg[start % WAL_SEGMENT_SIZE :] if segno == start // WAL_SEGMENT_SIZE else seg
        segno += 1
    return tl.ingest(start, bytes(data))


def redo_start(log: str) -> int:
    return parse_lsn(re.findall(r"redo starts at (\S+)", log)[-1])


# -- the history ------------------------------------------------------------------------------------

CONTENT = "SELECT count(*), md5(coalesce(string_agg(id || ':' || pad, ',' ORDER BY id, pad), '')) FROM t"


@dataclass
class Point:
    lsn: int
    count: int
    digest: str


@dataclass
class History:
    name: str
    rt: PgRuntime
    scratch: Scratch
    tl: Timeline
    points: list[Point]
    primary: Path  # stopped; the timeline holds its WAL up to points[-1] (test_image_set adds more later)


_HISTORIES: dict[str, History] = {}


def _close_histories() -> None:
    for h in _HISTORIES.values():
        h.scratch.close()
    _HISTORIES.clear()


atexit.register(_close_histories)


def get_history(name: str) -> History:
    """The cluster and its recorded history for one Postgres version, built once per session.

    Data directories are expensive here (creating an inode costs ~1.5 ms of system time on these
    machines, a cluster has ~1000 files), so test_image_set reuses this cluster's primary.
    """
    if name not in _HISTORIES:
        _HISTORIES[name] = _build_history(name)
    return _HISTORIES[name]


def _build_history(name: str) -> History:
    rt = runtime_for(name)
    scratch = Scratch(rt)
    try:
        pgdata = scratch.new_cluster("primary")
        tid = uuid.uuid4().hex
        tl = Timeline.import_initdb(scratch.root / "timelines" / tid, tid, pgdata, rt.bin_dir, rt.version)
        port = scratch.start(pgdata, PRIMARY_OPTIONS)
        sql(port, "CREATE TABLE t (id int, pad text); CREATE INDEX t_id ON t (id)")
        raw = []
        for i in range(8):
            sql(
                port,
                f"INSERT INTO t SELECT g, repeat('{i}', 100) FROM generate_series({i * 1000}, {i * 1000 + 1999}) g",
            )
            if i % 3 == 1:
                sql(port, f"DELETE FROM t WHERE id % 7 = {i}")
                sql(port, f"UPDATE t SET pad = 'u{i}' WHERE id % 11 = 0")
            if i == 2:
                sql(port, "CHECKPOINT")  # images get their redo point from the last checkpoint before them
            if i == 5:  # a compute stop/start: a shutdown checkpoint in the history
                scratch.stop(pgdata)
                port = scratch.start(pgdata, PRIMARY_OPTIONS)
            count, digest = sql(port, CONTENT)[0]
            lsn = int(sql(port, "SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")[0][0])
            raw.append((lsn, count, digest))
        scratch.stop(pgdata)
        ingest_pg_wal(tl, pgdata)
        points = [Point(tl.record_end_at_or_before(lsn), c, d) for lsn, c, d in raw]
        assert points[-1].lsn <= tl.last_record_lsn
    except BaseException:
        scratch.close()
        raise
    return History(name, rt, scratch, tl, points, pgdata)


@pytest.fixture(scope="module", params=["pg18", "pg15"])
def history(request) -> History:
    return get_history(request.param)


@dataclass
class Image:
    workdir: Path  # the redo worker's data directory (consumed by the test that needs a spare one)
    res: RedoResult
    info: ImageInfo
    control: dict  # pg_controldata right after the redo worker


def _image_at(h: History, index: int, name: str) -> Image:
    """Materialise at points[index] from initdb, replay it with the redo worker, image it."""
    lsn = h.points[index].lsn
    d = h.scratch.dir(name)
    h.tl.materialize(lsn, d / "pgdata")
    res = replay_to(h.rt, d / "pgdata", lsn, timeout=60)
    control = read_control_data(h.rt.bin_dir, d / "pgdata").raw
    info = create_image(d / "pgdata", d / "layers", h.tl.timeline_id, lsn, res.checkpoint_lsn, res.redo_lsn)
    return Image(d / "pgdata", res, info, control)


@pytest.fixture(scope="module")
def image(history) -> Image:
    return _image_at(history, 3, "image")


def _start_and_check(h: History, pgdata: Path, point: Point) -> str:
    port = h.scratch.start(pgdata)
    try:
        verify_replayed(str(pgdata.parent), port, point.lsn, pgdata.parent / "log")
        assert tuple(sql(port, CONTENT)[0]) == (point.count, point.digest)
        idx = sql(
            port, "SELECT count(*) FROM t WHERE id >= 0", options="-c enable_seqscan=off -c enable_bitmapscan=off"
        )[0][0]
        assert idx == point.count, "index and heap disagree"
        assert sql(port, "SELECT timeline_id FROM pg_control_checkpoint()")[0][0] == 1
        log = Scratch.log(pgdata)
        assert f"invalid record length at {format_lsn(point.lsn)}" in log, log[-2000:]
    finally:
        h.scratch.stop(pgdata, "immediate")
    return log


# -- tests ------------------------------------------------------------------------------------------


def test_redo_worker_leaves_directory_shut_down_in_recovery(history, image):
    h, res = history, image.res
    lsn = h.points[3].lsn
    assert res.lsn == lsn
    assert image.control["Database cluster state"] == SHUT_DOWN_IN_RECOVERY
    assert (
        parse_lsn(image.control["Latest checkpoint location"]),
        parse_lsn(image.control["Latest checkpoint's REDO location"]),
    ) == (res.checkpoint_lsn, res.redo_lsn)
    # C is the CHECKPOINT issued after step 2 (before I): not initdb's, not an end-of-recovery one
    assert h.tl.meta.base_checkpoint_lsn < res.redo_lsn <= res.checkpoint_lsn < h.points[2].lsn < lsn
    assert parse_lsn(image.control["Minimum recovery ending location"]) == lsn
    assert image.info.cluster_state == SHUT_DOWN_IN_RECOVERY and image.info.lsn == lsn
    assert not (image.workdir / "standby.signal").exists()
    assert postmaster_pid(image.workdir) is None


def test_materialize_from_image_at_its_own_lsn(history, image):
    """X = I exactly, with the default ("from standby") label; later X: test_image_of_image."""
    h, res = history, image.res
    k, label = 3, None
    point = h.points[k]
    target = h.scratch.dir(f"from-image-{k}") / "pgdata"
    wal_bytes = materialize_from_image(image.info, h.tl.read_wal, point.lsn, target, label_method=label)
    # fewer WAL bytes to replay than from initdb
    assert wal_bytes == point.lsn - res.redo_lsn < point.lsn - h.tl.meta.base_redo_lsn
    tail = (target / "pg_wal" / segment_file_name(point.lsn // WAL_SEGMENT_SIZE)).read_bytes()
    assert tail[point.lsn % WAL_SEGMENT_SIZE :].count(0) == WAL_SEGMENT_SIZE - point.lsn % WAL_SEGMENT_SIZE
    text = (target / "backup_label").read_text()
    assert ("BACKUP FROM: standby" if label is None else "BACKUP METHOD: pg_rewind") in text
    log = _start_and_check(h, target, point)
    # replay started at the image's redo point, not at initdb's checkpoint
    assert h.tl.meta.base_checkpoint_lsn < res.redo_lsn <= redo_start(log) <= res.checkpoint_lsn
    shutil.rmtree(target.parent)


def test_target_before_image_lsn_is_refused(history, image):
    h, res, info = history, image.res, image.info
    early = h.points[2]  # after the image's checkpoint, before the image's LSN
    assert res.checkpoint_lsn < early.lsn < info.lsn
    target = h.scratch.dir("early") / "pgdata"
    with pytest.raises(InvalidInput, match="pages may already hold later changes"):
        materialize_from_image(info, h.tl.read_wal, early.lsn, target)
    assert not target.exists()
    # bypassing our check (on the redo worker's own directory, which is what the image holds):
    # with the "from standby" label Postgres refuses it as well
    prepare_for_recovery(image.workdir, h.tl.read_wal, early.lsn, res.checkpoint_lsn, res.redo_lsn, "standby", "x")
    with pytest.raises(PostgresError):
        h.scratch.start(image.workdir)
    assert "WAL ends before end of online backup" in Scratch.log(image.workdir)
    assert postmaster_pid(image.workdir) is None


def test_image_of_image(history, image):
    """An image made from an older image instead of initdb, replaying across a shutdown checkpoint."""
    h, res = history, image.res
    j = h.points[6]
    work = h.scratch.root / "second-work"
    work.mkdir(parents=True)
    os.chmod(work, 0o755)  # the Postgres user replays in it when the tests run as root
    pgdata = work / "pgdata"
    materialize_from_image(image.info, h.tl.read_wal, j.lsn, pgdata)
    res2 = replay_to(h.rt, pgdata, j.lsn, timeout=60, log_file=work / "redo.log")
    info2 = create_image(
        pgdata, h.scratch.root / "second-layers", h.tl.timeline_id, j.lsn, res2.checkpoint_lsn, res2.redo_lsn
    )
    # C2 is the shutdown checkpoint of the restart after step 5: a standby replayed it without PANIC
    assert res.checkpoint_lsn < info2.redo_lsn == info2.checkpoint_lsn < j.lsn
    assert info2.lsn == j.lsn and info2.cluster_state == SHUT_DOWN_IN_RECOVERY
    last = h.points[7]
    target = h.scratch.dir("from-second") / "pgdata"
    # Timeline.materialize's label works as well for X >= I
    wal_bytes = materialize_from_image(info2.paths, h.tl.read_wal, last.lsn, target, label_method="pg_rewind")
    assert wal_bytes == last.lsn - info2.redo_lsn < last.lsn - res.redo_lsn
    assert "BACKUP METHOD: pg_rewind" in (target / "backup_label").read_text()
    log = _start_and_check(h, target, last)
    assert redo_start(log) >= info2.redo_lsn
    shutil.rmtree(target.parent)


def test_redo_worker_without_a_checkpoint_keeps_the_old_redo_point(history):
    """No checkpoint record between initdb and I: the restartpoint is skipped, the image still works."""
    h = history
    img = _image_at(h, 1, "no-checkpoint")
    res = img.res
    assert (res.checkpoint_lsn, res.redo_lsn) == (h.tl.meta.base_checkpoint_lsn, h.tl.meta.base_redo_lsn)
    assert img.control["Database cluster state"] == SHUT_DOWN_IN_RECOVERY
    point = h.points[2]
    target = h.scratch.dir("from-no-checkpoint") / "pgdata"
    materialize_from_image(img.info, h.tl.read_wal, point.lsn, target)
    _start_and_check(h, target, point)
    shutil.rmtree(target.parent)

    # the redo worker's directory again, given WAL only up to points[1]: asking for more times out
    prepare_for_recovery(
        img.workdir, h.tl.read_wal, h.points[1].lsn, res.checkpoint_lsn, res.redo_lsn, "standby", "timeout"
    )
    with pytest.raises(
        Timeout, match=f"did not reach {format_lsn(point.lsn)}.*replayed only to {format_lsn(h.points[1].lsn)}"
    ):
        replay_to(h.rt, img.workdir, point.lsn, timeout=1.5)
    assert postmaster_pid(img.workdir) is None
    shutil.rmtree(img.workdir.parent)


def test_redo_worker_refusals(history, tmp_path):
    h = history
    (tmp_path / "PG_VERSION").write_text("18\n")
    with pytest.raises(InvalidInput, match="backup_label"):
        replay_to(h.rt, tmp_path, h.points[0].lsn)
    with pytest.raises(InvalidInput, match="not a data directory"):
        replay_to(h.rt, tmp_path / "nothing", h.points[0].lsn)


def test_redo_worker_listens_on_no_tcp_port(history, image):
    """No other local user can connect to the worker: no TCP, a socket in a 0700 directory removed after."""
    log = image.workdir.with_name(image.workdir.name + ".redo.log").read_text()
    sockets = re.findall(r'listening on Unix socket "([^"]+)"', log)
    assert sockets and "listening on IPv4" not in log and "listening on IPv6" not in log
    assert all(not Path(s).parent.exists() for s in sockets)  # the private directory is gone
