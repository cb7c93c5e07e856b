"""One safekeeper, damaged WAL: `safekeeper repair` rebuilds the timeline at the end of the pageserver's WAL.

With no peer to copy from, the timeline restarts where the pageserver's durable WAL ends; the repair says
exactly which WAL (if any) existed only on the safekeeper and is lost. Real daemons, real Postgres.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import connect
from waiting import wait_until

from neonctl.cli import main as cli_main
from neonctl.engine import ports
from neonctl.engine.compute import dir_pool
from neonctl.engine.compute.endpoint import directory_pool, read_state
from neonctl.engine.lifecycle import delete_project
from neonctl.engine.lsn import format_lsn, segment_file_name
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.project import load_project
from neonctl.engine.safekeeper.admin import start_safekeeper, stop_safekeeper
from neonctl.engine.safekeeper.client import SafekeeperClient
from neonctl.engine.safekeeper.control_file import load

NAME = "onesk"
DAMAGED = "is damaged and will not be served until repaired"


@pytest.fixture(scope="module")
def p1():
    assert cli_main(["init", "--name", NAME, "--safekeepers", "1", "-o", "json"]) == 0
    assert cli_main(["project", "set", "-p", NAME, "--suspend-timeout", "0", "-o", "json"]) == 0
    # Daemons are stopped and restarted here: ports away from the defaults (as test_quorum does).
    project = load_project(NAME)
    c = project.config
    free = ports.allocate(20000 + (os.getpid() * 17 + 5000) % 12000, set(), 3)
    c.pageserver_port, c.broker_port, c.safekeepers[0]["port"] = free
    project.save()
    assert cli_main(["start", "-p", NAME, "-o", "json"]) == 0
    project = load_project(NAME)
    yield project
    delete_project(project)


def tid(project) -> str:
    return project.branch("main").timeline_id


def sk(project) -> dict:
    return SafekeeperClient(1, project.safekeeper_addrs()[1]).timeline(tid(project))


def pageserver_lsn(project) -> int:
    return PageserverClient.of(project).timeline(tid(project))["last_record_lsn"]


def ensure_endpoint(project, cli):
    if read_state(project, "main") is None:
        cli("endpoint", "start", "main", "-p", project.name)


def damage_wal_near_flush(project) -> int:
    """With the safekeeper stopped: overwrite WAL just below its flush LSN; returns that flush LSN."""
    tl_dir = project.safekeeper_dir(1) / "timelines" / tid(project)
    flushed = load(tl_dir / "safekeeper.control").flush_lsn
    seg = 16 << 20
    damaged = flushed - 3000
    with open(tl_dir / "wal" / segment_file_name(damaged // seg), "r+b") as f:
        f.seek(damaged % seg)
        f.write(b"\xab" * 512)
    return flushed


def start_damaged(project, cli, error: str = "WAL is damaged") -> None:
    start_safekeeper(project, 1)
    _, out, _ = cli("safekeeper", "list", "-p", project.name, "-o", "json")
    row = next(r for r in json.loads(out) if r["branch"] == "main")
    assert row["state"] == "corrupt" and error in row["error"], row
    if read_state(project, "main") is None:  # a start is refused, saying how to repair
        _, _, err = cli("endpoint", "start", "main", "-p", project.name, ok=False)
        assert "is damaged" in err and "safekeeper repair 1" in err and "pageserver holds" in err, err


def repair(project, cli) -> dict:
    _, out, _ = cli("safekeeper", "repair", "1", "-p", project.name, "-o", "json")
    rows = json.loads(out)
    assert len(rows) == 1 and rows[0]["branch"] == "main" and rows[0]["repaired"] is True
    row = rows[0]
    assert row["source"] == "pageserver"
    log = (project.safekeeper_dir(1) / "sk1.log").read_text()
    assert f"WARNING safekeeper: timeline {tid(project)}: {row['summary']}" in log
    assert not sk(project)["corrupt"]
    for slot in dir_pool.slots(directory_pool(project)):  # a kept directory from beyond the point is never reused
        assert (dir_pool.read_record(slot) or {}).get("timeline_id") != tid(project)
    return row


def streams_again(project, cli, table: str, rows: int, total: int, at: int) -> None:
    """The rebuilt timeline serves a compute: every row committed before `at` is there, new commits stream."""
    ensure_endpoint(project, cli)
    with connect(project) as conn:
        assert conn.execute(f"SELECT count(*), sum(id) FROM {table}").fetchone() == (rows, total)
        conn.execute(f"INSERT INTO {table} VALUES (-1)")
        head = conn.execute("SELECT pg_current_wal_flush_lsn() - '0/0'::pg_lsn").fetchone()[0]
    assert head > at
    wait_until(lambda: sk(project)["streaming"] and sk(project)["flush_lsn"] >= head, 15,
               "the safekeeper to stream from the new compute")
    wait_until(lambda: pageserver_lsn(project) >= head, 15, "the pageserver to stream from the safekeeper again")
    assert sk(project)["wal_start_lsn"] == at  # nothing below the point was copied back, nor needed


@pytest.mark.daemon_errors(DAMAGED)
def test_damaged_wal_is_rebuilt_from_the_pageserver_losing_nothing(p1, cli):
    ensure_endpoint(p1, cli)
    with connect(p1) as conn:
        conn.execute("CREATE TABLE kept AS SELECT g AS id FROM generate_series(1, 500) g")
        conn.execute("INSERT INTO kept SELECT generate_series(501, 600)")
    cli("endpoint", "stop", "main", "-p", p1.name)  # its shutdown checkpoint is the last WAL
    wait_until(lambda: pageserver_lsn(p1) >= sk(p1)["flush_lsn"], 15, "the pageserver to hold all the WAL")
    stop_safekeeper(p1, 1)  # a clean stop: the control file's flush LSN is exact
    flushed = damage_wal_near_flush(p1)
    start_damaged(p1, cli)

    row = repair(p1, cli)
    assert row["recovered_to"] == format_lsn(flushed)
    assert (row["lost_from"], row["lost_to"], row["lost_bytes"]) == (None, None, 0)
    assert "nothing is lost" in row["summary"] and row["endpoint_stopped"] is False
    _, out, _ = cli("safekeeper", "list", "-p", p1.name, "-o", "json")
    assert next(r for r in json.loads(out) if r["branch"] == "main")["state"] == "running"
    streams_again(p1, cli, "kept", 600, 600 * 601 // 2, flushed)


@pytest.mark.daemon_errors(DAMAGED)
def test_wal_only_the_safekeeper_held_is_reported_lost(p1, cli, monkeypatch):
    ensure_endpoint(p1, cli)
    with connect(p1) as conn:
        conn.execute("CREATE TABLE ahead AS SELECT g AS id FROM generate_series(1, 300) g")
    wait_until(lambda: pageserver_lsn(p1) >= sk(p1)["flush_lsn"], 15, "the pageserver to hold the first rows")
    term = sk(p1)["term"]
    ps = p1.daemon("pageserver")
    ps.stop()  # from here on only the safekeeper gets the WAL
    try:
        with connect(p1) as conn:
            for i in range(300, 600, 30):  # committed: the lone safekeeper has them (the damage is among them)
                conn.execute(f"INSERT INTO ahead SELECT generate_series({i + 1}, {i + 30})")
        stop_safekeeper(p1, 1)  # the compute keeps running: the repair must stop it
        flushed = damage_wal_near_flush(p1)
    finally:
        ps.start()
    start_damaged(p1, cli)
    point = pageserver_lsn(p1)
    assert point < flushed - 3000  # the damage lies in the WAL the pageserver never got

    row = repair(p1, cli)
    assert row["recovered_to"] == row["lost_from"] == format_lsn(point)
    assert row["lost_to"] == format_lsn(flushed) and row["lost_bytes"] == flushed - point
    lost = f"the WAL from {format_lsn(point)} to {format_lsn(flushed)} ({flushed - point} bytes) existed only on"
    assert lost in row["summary"]
    assert row["endpoint_stopped"] is True and read_state(p1, "main") is None  # it was ahead of the point
    assert row["term"] == term  # the term is kept: a vote is never given twice
    info = sk(p1)
    assert (info["flush_lsn"], info["commit_lsn"], info["timeline_start_lsn"]) == (point, point, point)
    assert all(lsn <= point for _, lsn in info["term_history"])
    _, out, _ = cli("safekeeper", "repair", "1", "-p", p1.name, "-o", "json")
    assert json.loads(out) == []  # nothing damaged any more
    # the table says the same in one sentence
    monkeypatch.setattr("neonctl.engine.safekeeper.admin.repair_safekeeper", lambda project, sk_id: [row])
    _, out, _ = cli("safekeeper", "repair", "1", "-p", p1.name)
    assert "Summary" in out and lost in out
    streams_again(p1, cli, "ahead", 300, 300 * 301 // 2, point)  # the 300 rows after the point are gone


@pytest.mark.daemon_errors(DAMAGED)
def test_unreadable_control_file_says_the_loss_beyond_the_point_is_unknown(p1, cli):
    ensure_endpoint(p1, cli)
    with connect(p1) as conn:
        conn.execute("CREATE TABLE unread AS SELECT g AS id FROM generate_series(1, 200) g")
    cli("endpoint", "stop", "main", "-p", p1.name)
    wait_until(lambda: pageserver_lsn(p1) >= sk(p1)["flush_lsn"], 15, "the pageserver to hold all the WAL")
    stop_safekeeper(p1, 1)
    ctl = p1.safekeeper_dir(1) / "timelines" / tid(p1) / "safekeeper.control"
    data = bytearray(ctl.read_bytes())
    data[20] ^= 0xFF
    ctl.write_bytes(bytes(data))
    start_damaged(p1, cli, error="failed its checksum")
    point = pageserver_lsn(p1)

    row = repair(p1, cli)
    assert row["recovered_to"] == row["lost_from"] == format_lsn(point)
    assert row["lost_to"] is None and row["lost_bytes"] is None and "is unknown" in row["summary"]
    info = sk(p1)
    assert (info["flush_lsn"], info["timeline_start_lsn"], info["term_history"]) == (point, point, [])
    streams_again(p1, cli, "unread", 200, 200 * 201 // 2, point)
