"""Fault injection: kill -9 the compute mid-write; stop the safekeeper under a commit."""

import os
import signal
import threading
import time

import psycopg
import pytest
from conftest import connect

from neonctl.engine.compute.endpoint import postgres_pid, read_state


def test_kill9_compute_loses_no_acknowledged_insert(pg18, cli):
    cli("endpoint", "start", "main", "-p", pg18.name)
    with connect(pg18) as conn:
        conn.execute("DROP TABLE IF EXISTS acked")
        conn.execute("CREATE TABLE acked (id int PRIMARY KEY, pad text)")
    acked: list[int] = []
    stop = threading.Event()

    def writer():
        try:
            with connect(pg18) as conn:
                i = 0
                while not stop.is_set():
                    i += 1
                    conn.execute("INSERT INTO acked VALUES (%s, repeat('x', 200))", (i,))
                    acked.append(i)  # only after the commit returned
        except psycopg.Error:
            pass  # the compute died under us

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(1.5)
    pid = postgres_pid(read_state(pg18, "main").pgdata)
    os.kill(pid, signal.SIGKILL)
    stop.set()
    t.join(10)
    assert len(acked) > 50, "the workload should have committed rows before the crash"
    rc, out, err = cli("endpoint", "start", "main", "-p", pg18.name)
    assert "crashed" in err
    with connect(pg18) as conn:
        present = {r[0] for r in conn.execute("SELECT id FROM acked")}
    missing = set(acked) - present
    assert not missing, f"{len(missing)} acknowledged inserts lost, e.g. {sorted(missing)[:5]}"
    cli("endpoint", "stop", "main", "-p", pg18.name)


def test_commit_waits_while_safekeeper_is_down(pg18, cli):
    cli("endpoint", "start", "main", "-p", pg18.name)
    with connect(pg18) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS waits (id int)")
    sk = pg18.daemon("sk1")
    sk.stop(immediate=True)
    done = threading.Event()
    errors = []

    def commit():
        try:
            with connect(pg18) as conn:
                conn.execute("INSERT INTO waits VALUES (42)")
            done.set()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=commit)
    t.start()
    try:
        assert not done.wait(3.0), "a commit must not succeed while the only safekeeper is down"
        with connect(pg18) as conn:
            waiting = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'").fetchone()[0]
        assert waiting == 1
    finally:
        cli("start", "-p", pg18.name)
    assert done.wait(15), f"the commit must resume once the safekeeper is back: {errors}"
    t.join()
    cli("endpoint", "stop", "main", "-p", pg18.name)
    cli("endpoint", "start", "main", "-p", pg18.name)
    with connect(pg18) as conn:
        assert conn.execute("SELECT count(*) FROM waits WHERE id = 42").fetchone()[0] == 1
    cli("endpoint", "stop", "main", "-p", pg18.name)
