"""Materialising a data directory at an LSN gives exactly what was committed at that LSN.

Also guards the two silent failures measured in prototype-findings §2: a clean
base without a backup_label (no redo at all) must be refused, not served.
"""

import shutil
from pathlib import Path

import psycopg
import pytest
from conftest import connect
from waiting import wait_until

from neonctl.engine.compute.endpoint import compute_config, read_state, verify_replayed
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.ports import allocate
from neonctl.errors import PostgresError


def _materialize(project, lsn, endpoint: str) -> int:
    """The pageserver derives the directory from the endpoint name: compute root/endpoints/NAME/pgdata."""
    tl = project.branch("main").timeline_id
    return PageserverClient.of(project).basebackup(tl, endpoint, lsn=lsn, timeout=30)["lsn"]


class Scratch:
    """A throwaway Postgres on a materialised directory, not attached to any safekeeper."""

    def __init__(self, project, root: Path, name: str):
        self.project, self.runtime = project, project.runtime()
        self.name = f"tm-{name}"
        self.dir = project.compute_root() / "endpoints" / self.name
        self.pgdata = self.dir / "pgdata"
        self.port = allocate(56500, set())[0]

    def prepare(self, lsn):
        self.dir.mkdir(parents=True)
        _materialize(self.project, lsn, self.name)
        conf = compute_config(self.project, self.port, self.dir, fsync=False)
        conf = conf.replace("synchronous_standby_names", "#synchronous_standby_names")
        with open(self.pgdata / "postgresql.conf", "a") as f:
            f.write(conf)

    def start(self):
        self.runtime.chown(self.dir, recursive=True)
        self.runtime.run([self.runtime.bin("pg_ctl"), "start", "-w", "-D", str(self.pgdata),
                          "-l", str(self.dir / "log")])

    def query(self, sql):
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as c:
            return c.execute(sql).fetchone()

    def stop(self):
        self.runtime.run([self.runtime.bin("pg_ctl"), "stop", "-m", "immediate", "-D", str(self.pgdata)])
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def history(pg18, cli):
    """Commit rows one by one, recording the WAL insert LSN after each commit."""
    cli("endpoint", "start", "main", "-p", pg18.name)
    points = []
    with connect(pg18) as conn:
        conn.execute("DROP TABLE IF EXISTS hist")
        conn.execute("CREATE TABLE hist (id int)")
        for i in range(1, 9):
            conn.execute("INSERT INTO hist SELECT generate_series(1, %s)", (i * 100,))
            conn.execute("DELETE FROM hist WHERE id > %s", (i * 50,)) if i % 3 == 0 else None
            n = conn.execute("SELECT count(*) FROM hist").fetchone()[0]
            lsn = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()[0]
            points.append((int(lsn), n))
    tl = pg18.branch("main").timeline_id
    pageserver = PageserverClient.of(pg18)
    wait_until(lambda: pageserver.timeline(tl)["last_record_lsn"] >= points[-1][0], 20,
               "the pageserver to ingest the recorded history")
    yield points
    cli("endpoint", "stop", "main", "-p", pg18.name)


def test_materialize_at_each_recorded_lsn(pg18, history, scratch_dir):
    for lsn, expected in history[::3] + [history[-1]]:
        s = Scratch(pg18, scratch_dir, f"at{lsn:x}")
        s.prepare(lsn)
        s.start()
        try:
            assert s.query("SELECT count(*) FROM hist")[0] == expected
            verify_replayed(str(s.dir), s.port, lsn, s.dir / "log")
        finally:
            s.stop()


def test_missing_backup_label_is_refused_not_served(pg18, history, scratch_dir):
    lsn, expected = history[-1]
    s = Scratch(pg18, scratch_dir, "nolabel")
    s.prepare(lsn)
    label = (s.pgdata / "backup_label").read_text()
    (s.pgdata / "backup_label").unlink()
    s.start()
    try:
        try:
            count = s.query("SELECT count(*) FROM hist")[0]
        except psycopg.errors.UndefinedTable:
            count = None
        if "BACKUP METHOD: pg_rewind" in label:
            # a clean base without its label: Postgres silently skips all redo ...
            assert count is None
        if count != expected:
            # ... and the guard refuses such a compute instead of serving stale data
            with pytest.raises(PostgresError, match="WAL was not replayed"):
                verify_replayed(str(s.dir), s.port, lsn, s.dir / "log")
        else:
            verify_replayed(str(s.dir), s.port, lsn, s.dir / "log")  # an image's own control file led replay: correct
    finally:
        s.stop()


def test_materialized_wal_stops_exactly_at_target(pg18, history, scratch_dir):
    lsn, _ = history[2]
    s = Scratch(pg18, scratch_dir, "stop")
    s.prepare(lsn)
    seg = 16 << 20
    last = sorted((s.pgdata / "pg_wal").glob("0000*"))[-1]
    assert int(last.name[16:], 16) == lsn // seg % 256
    tail = last.read_bytes()[lsn % seg :]
    assert tail == bytes(len(tail)), "WAL after the target must be zeroed, or Postgres replays past it"
    shutil.rmtree(s.dir)


def test_live_endpoint_state_mentions_start_lsn(pg18, history):
    assert read_state(pg18, "main").start_lsn > 0
