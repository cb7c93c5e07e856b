"""Three safekeepers, quorum two: faults under a write load that logs every acknowledged commit.

One project with `init --safekeepers 3` is shared by the module. A commit counts
as acknowledged only when the client's COMMIT returned without a warning; the
workload never cancels a commit (Postgres reports a cancelled sync-commit wait
as success with a WARNING although the standbys may not have it).
"""

from __future__ import annotations

import json
import os
import signal
import threading

import psycopg
import pytest
from conftest import BlockedCommit, Writer, assert_all_present, connect
from waiting import wait_until

from neonctl.cli import main as cli_main
from neonctl.engine import client, ports
from neonctl.engine.broker.client import BrokerClient
from neonctl.engine.compute.endpoint import (
    postgres_pid,
    read_state,
    start_endpoint,
    stop_endpoint,
)
from neonctl.engine.lifecycle import delete_project
from neonctl.engine.lsn import segment_file_name
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.project import load_project
from neonctl.engine.safekeeper.admin import start_safekeeper, stop_safekeeper
from neonctl.engine.safekeeper.client import SafekeeperClient
from neonctl.engine.safekeeper.control_file import load
from neonctl.engine.safekeeper.election_driver import elect
from neonctl.errors import Conflict, NeonctlError


@pytest.fixture(scope="module")
def q3():
    assert cli_main(["init", "--name", "quorum", "--safekeepers", "3", "-o", "json"]) == 0
    # These tests stop and restart daemons. On a machine shared with other neonctl users, a port left
    # free for a moment can be taken by someone else's new project: use ports away from the defaults.
    project = load_project("quorum")
    c = project.config
    free = ports.allocate(20000 + (os.getpid() * 13) % 12000, set(), 5)  # below the ephemeral range
    c.pageserver_port, c.broker_port = free[:2]
    for sk_cfg, port in zip(c.safekeepers, free[2:], strict=False):
        sk_cfg["port"] = port
    project.save()
    assert cli_main(["start", "-p", "quorum", "-o", "json"]) == 0
    project = load_project("quorum")
    yield project
    delete_project(project)


def tid(project) -> str:
    return project.branch("main").timeline_id


def sk(project, sk_id: int) -> dict:
    return SafekeeperClient(sk_id, project.safekeeper_addrs()[sk_id]).timeline(tid(project))


def pageserver_lsn(project) -> int:
    return PageserverClient(project.pageserver_addr).timeline(tid(project))["last_record_lsn"]


def caught_up(project, sk_id: int, ids=(1, 2, 3)):
    """sk_id is in the others' term and holds as much WAL as the most advanced of them."""
    mine = sk(project, sk_id)
    others = [sk(project, i) for i in ids if i != sk_id]
    return (mine["term"] == max(o["term"] for o in others)
            and mine["flush_lsn"] >= max(o["flush_lsn"] for o in others) and mine["commit_lsn"] > 0)


def ensure_endpoint(project, cli):
    st = read_state(project, "main")
    if st is None or postgres_pid(st.pgdata) is None:
        cli("endpoint", "start", "main", "-p", project.name)


def ensure_all_safekeepers(project):
    for i in (1, 2, 3):
        start_safekeeper(project, i)


def kill_compute(project):
    pgdata = read_state(project, "main").pgdata
    pid = postgres_pid(pgdata)
    assert pid
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: postgres_pid(pgdata) is None, 10, "the compute to die")


def test_three_safekeepers_form_the_synchronous_quorum(q3, cli):
    _, out, _ = cli("project", "get", "-p", q3.name, "-o", "json")
    assert json.loads(out)["safekeepers"] == 3
    ensure_endpoint(q3, cli)
    with connect(q3) as conn:
        assert conn.execute("SHOW synchronous_standby_names").fetchone()[0] == "ANY 2 (sk1, sk2, sk3)"
        conn.execute("CREATE TABLE hello AS SELECT 1 AS x")
    term = sk(q3, 1)["term"]
    wait_until(lambda: all(sk(q3, i)["streaming"] and sk(q3, i)["term"] == term for i in (1, 2, 3)), 10,
               "every safekeeper streaming in the elected term")
    _, out, _ = cli("status", "-p", q3.name, "-o", "json")
    sks = [d for d in json.loads(out)["daemons"] if d["name"].startswith("sk")]
    assert len(sks) == 3
    for d in sks:
        v = d["timelines"][tid(q3)]
        assert v["term"] == term and v["commit_lsn"] > 0 and "lag" in v
    _, out, _ = cli("safekeeper", "list", "-p", q3.name)
    assert "Commit Lsn" in out and "Lag" in out


def test_peer_recovery_without_a_compute(q3, cli):
    ensure_all_safekeepers(q3)
    ensure_endpoint(q3, cli)
    stop_safekeeper(q3, 3, immediate=True)
    with connect(q3) as conn:
        conn.execute("CREATE TABLE norecv AS SELECT g AS id FROM generate_series(1, 20000) g")
    cli("endpoint", "stop", "main", "-p", q3.name)  # no compute from here on
    start_safekeeper(q3, 3)
    wait_until(lambda: caught_up(q3, 3), 15, "sk3 to catch up from its peers")
    log = (q3.safekeeper_dir(3) / "sk3.log").read_text()
    assert not sk(q3, 3)["compute"] and not sk(q3, 3)["streaming"], log[-3000:]
    assert "recovered" in log
    # the pageserver reports what it persisted; every safekeeper learns it
    head = sk(q3, 1)["flush_lsn"]
    wait_until(lambda: max(sk(q3, i)["remote_consistent_lsn"] for i in (1, 2, 3)) >= head, 15,
               "the pageserver to report its persisted LSN")


def test_kill9_one_of_three_during_load(q3, cli):
    ensure_endpoint(q3, cli)
    w = Writer(q3, "load1")
    try:
        wait_until(lambda: len(w.acked) > 100, 30, "the workload to commit rows")
        # The victim is the safekeeper the pageserver most likely streams from: the highest commit_lsn.
        victim = max((1, 2, 3), key=lambda i: (sk(q3, i)["commit_lsn"], -i))
        stop_safekeeper(q3, victim, immediate=True)
        n0, ps0 = len(w.acked), pageserver_lsn(q3)
        wait_until(lambda: len(w.acked) > n0 + 50, 10, "commits to go on with two safekeepers")
        wait_until(lambda: pageserver_lsn(q3) > ps0, 15, "the pageserver to ingest from another safekeeper")
        start_safekeeper(q3, victim)
        wait_until(lambda: sk(q3, victim)["streaming"], 15, f"sk{victim} to stream from the compute again")
    finally:
        acked = w.finish()
    assert w.error is None, w.error
    wait_until(lambda: caught_up(q3, victim), 15, f"sk{victim} to catch up")
    cli("endpoint", "stop", "main", "-p", q3.name)
    cli("endpoint", "start", "main", "-p", q3.name)
    assert_all_present(q3, "load1", acked)


def test_kill9_two_of_three_blocks_commits(q3, cli):
    ensure_endpoint(q3, cli)
    c = BlockedCommit(q3, "minority")
    stop_safekeeper(q3, 2, immediate=True)
    stop_safekeeper(q3, 3, immediate=True)
    c.start()
    try:
        c.assert_waiting("a commit must not succeed on a minority of safekeepers")
    finally:
        start_safekeeper(q3, 3)
    # within 2 s: the returning safekeeper already holds the commit (recovered from its peer) and says so
    # as soon as it streams, instead of waiting for the compute's next WAL
    c.assert_committed("the commit must resume once a quorum is back", within=2.0)
    start_safekeeper(q3, 2)
    wait_until(lambda: caught_up(q3, 2), 15, "sk2 to catch up")
    c.assert_kept()


def test_kill9_compute_and_safekeeper_together(q3, cli):
    ensure_endpoint(q3, cli)
    term0 = sk(q3, 2)["term"]
    w = Writer(q3, "load2")
    wait_until(lambda: len(w.acked) > 100, 30, "the workload to commit rows")
    kill_compute(q3)
    stop_safekeeper(q3, 1, immediate=True)
    acked = w.finish()
    assert len(acked) > 50, "the workload should have committed rows before the crash"
    _, _, err = cli("endpoint", "start", "main", "-p", q3.name)
    assert "crashed" in err and f"electing term {term0 + 1}" in err
    assert_all_present(q3, "load2", acked)
    start_safekeeper(q3, 1)
    wait_until(lambda: caught_up(q3, 1), 15, "sk1 to catch up")


def test_divergent_tail_is_truncated(q3, cli):
    """sk1 alone receives WAL the other two never get; the next term, elected without sk1, starts
    below it; when sk1 returns, that tail is cut and replaced by the new term's WAL."""
    ensure_all_safekeepers(q3)
    ensure_endpoint(q3, cli)
    with connect(q3) as conn:
        conn.execute("CREATE TABLE tail (id int PRIMARY KEY)")
        for i in range(1, 51):
            conn.execute("INSERT INTO tail VALUES (%s)", (i,))
    wait_until(lambda: caught_up(q3, 1), 10, "all three to hold the acknowledged rows")
    stop_safekeeper(q3, 2, immediate=True)
    stop_safekeeper(q3, 3, immediate=True)
    before = sk(q3, 1)["flush_lsn"]

    def unacknowledged():
        try:
            with connect(q3) as conn:
                conn.execute("INSERT INTO tail VALUES (999999)")
            raise AssertionError("a commit on a minority returned")
        except psycopg.Error:
            pass  # the compute dies under it

    t = threading.Thread(target=unacknowledged, daemon=True)
    t.start()
    tail_end = wait_until(lambda: sk(q3, 1)["flush_lsn"] > before and sk(q3, 1)["flush_lsn"], 10,
                          "the unacknowledged commit's WAL to reach sk1")
    kill_compute(q3)
    stop_safekeeper(q3, 1, immediate=True)
    t.join(10)
    start_safekeeper(q3, 2)
    start_safekeeper(q3, 3)
    cli("endpoint", "start", "main", "-p", q3.name)
    new = sk(q3, 2)
    term, start = new["term_history"][-1]
    assert term == new["term"] and start < tail_end, "sk1 must hold WAL past the new term's start"
    with connect(q3) as conn:
        ids = {r[0] for r in conn.execute("SELECT id FROM tail")}
        assert ids == set(range(1, 51)), "acknowledged rows kept, the unacknowledged one gone"
        conn.execute("INSERT INTO tail SELECT g FROM generate_series(1000, 3000) g")  # new WAL over the old tail
    start_safekeeper(q3, 1)
    wait_until(lambda: caught_up(q3, 1), 15, "sk1 to join the new term")
    s1 = sk(q3, 1)
    assert s1["term_history"] == new["term_history"]
    end = min(s1["flush_lsn"], sk(q3, 2)["flush_lsn"])
    assert end > tail_end
    path = f"/v1/timeline/{tid(q3)}/wal?start={start}&upto=flush&max={end - start}"

    def raw(i):
        r = client.request(q3.safekeeper_addrs()[i], "GET", path)  # sends the project's API credential
        assert r.status == 200, r.status
        return r.body

    assert raw(1) == raw(2), "sk1's WAL from the new term's start must be the quorum's"
    log = (q3.safekeeper_dir(1) / "sk1.log").read_text()
    assert "truncated divergent WAL" in log


def race(attempt, timeout: float) -> tuple[list, list[NeonctlError]]:
    """Run `attempt` in two threads at once: (both outcomes, the NeonctlErrors among them)."""
    outcomes: list = []

    def one():
        try:
            outcomes.append(attempt())
        except NeonctlError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return outcomes, [o for o in outcomes if isinstance(o, NeonctlError)]


def test_racing_endpoint_starts_one_wins(q3, cli):
    ensure_all_safekeepers(q3)
    if read_state(q3, "main"):
        stop_endpoint(q3, "main")
    results, errors = race(lambda: start_endpoint(load_project(q3.name), "main"), 120)
    assert len(results) == 2 and len(errors) == 1, results
    assert isinstance(errors[0], Conflict) and "already running" in str(errors[0])
    stop_endpoint(q3, "main")
    # The same race without the project lock: two proposers of one term, exactly one is elected.
    term = max(sk(q3, i)["term"] for i in (1, 2, 3)) + 1
    outcomes, lost = race(lambda: elect(q3, tid(q3), term=term), 60)
    assert len(outcomes) == 2 and len(lost) == 1, outcomes
    assert isinstance(lost[0], Conflict) and f"lost the election for term {term}" in str(lost[0])


def test_a_branch_elects_its_own_terms(q3, cli):
    ensure_all_safekeepers(q3)
    ensure_endpoint(q3, cli)
    with connect(q3) as conn:
        conn.execute("CREATE TABLE forked AS SELECT 7 AS x")
    cli("branch", "create", "--name", "dev", "-p", q3.name)
    cli("endpoint", "start", "dev", "-p", q3.name)
    with connect(q3, "dev") as conn:
        assert conn.execute("SELECT x FROM forked").fetchone()[0] == 7
        conn.execute("INSERT INTO forked VALUES (8)")
    dev = q3.branch("dev").timeline_id

    def dev_info(i):
        return SafekeeperClient(i, q3.safekeeper_addrs()[i]).timeline(dev)

    wait_until(lambda: all(dev_info(i)["term"] == 1 and dev_info(i)["streaming"] for i in (1, 2, 3)), 10,
               "the branch's first term on all three")
    cli("endpoint", "stop", "dev", "-p", q3.name)


@pytest.mark.daemon_errors("is damaged and will not be served until repaired")
def test_corrupt_control_file_is_refused_until_repaired(q3, cli):
    ensure_all_safekeepers(q3)
    ensure_endpoint(q3, cli)
    stop_safekeeper(q3, 3)
    path = q3.safekeeper_dir(3) / "timelines" / tid(q3) / "safekeeper.control"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(data)
    start_safekeeper(q3, 3)
    with connect(q3) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS during_repair (id int)")
        conn.execute("INSERT INTO during_repair VALUES (1)")  # the other two go on
    _, out, _ = cli("safekeeper", "list", "-p", q3.name, "-o", "json")
    row = next(r for r in json.loads(out) if r["safekeeper"] == 3 and r["branch"] == "main")
    assert row["state"] == "corrupt" and "checksum" in row["error"]
    with pytest.raises(NeonctlError, match="damaged"):
        sk(q3, 3)
    _, out, _ = cli("safekeeper", "repair", "3", "-p", q3.name, "-o", "json")
    assert json.loads(out)[0]["repaired"]
    wait_until(lambda: caught_up(q3, 3), 15, "sk3 to be rebuilt from its peers")
    with connect(q3) as conn:
        conn.execute("INSERT INTO during_repair VALUES (2)")
    wait_until(lambda: sk(q3, 3)["streaming"], 10, "sk3 to stream again")


@pytest.mark.daemon_errors("is damaged and will not be served until repaired")
def test_torn_wal_segment_is_detected_and_repaired(q3, cli):
    ensure_all_safekeepers(q3)
    ensure_endpoint(q3, cli)
    with connect(q3) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS torn AS SELECT g AS id FROM generate_series(1, 2000) g")
    wait_until(lambda: caught_up(q3, 2), 10, "sk2 to hold the rows")
    stop_safekeeper(q3, 2)  # a clean stop: the control file's flush LSN is exact
    tl_dir = q3.safekeeper_dir(2) / "timelines" / tid(q3)
    flushed = load(tl_dir / "safekeeper.control").flush_lsn
    seg = 16 << 20
    damaged = flushed - 3000
    seg_file = tl_dir / "wal" / segment_file_name(damaged // seg)
    with open(seg_file, "r+b") as f:
        f.seek(damaged % seg)
        f.write(b"\xab" * 512)
    start_safekeeper(q3, 2)
    _, out, _ = cli("safekeeper", "list", "-p", q3.name, "-o", "json")
    row = next(r for r in json.loads(out) if r["safekeeper"] == 2 and r["branch"] == "main")
    assert row["state"] == "corrupt" and "WAL is damaged" in row["error"]
    with connect(q3) as conn:
        conn.execute("INSERT INTO torn VALUES (-1)")  # sk1 and sk3 go on
    cli("safekeeper", "repair", "2", "-p", q3.name)
    wait_until(lambda: caught_up(q3, 2), 15, "sk2 to be rebuilt from its peers")


def test_broker_down_everyone_goes_on(q3, cli):
    ensure_all_safekeepers(q3)
    ensure_endpoint(q3, cli)
    broker = q3.daemon("broker")
    broker.stop(immediate=True)
    try:
        with connect(q3) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS nobroker (id int)")
            conn.execute("INSERT INTO nobroker SELECT generate_series(1, 1000)")
            head = conn.execute("SELECT pg_current_wal_flush_lsn() - '0/0'::pg_lsn").fetchone()[0]
        wait_until(lambda: all(sk(q3, i)["commit_lsn"] >= head for i in (1, 2, 3)), 15,
                   "commit_lsn to advance from the peers directly")
        wait_until(lambda: pageserver_lsn(q3) >= head, 15, "the pageserver to ingest on its last known safekeeper")
        cli("endpoint", "stop", "main", "-p", q3.name)
        cli("endpoint", "start", "main", "-p", q3.name)  # an election needs no broker
        with connect(q3) as conn:
            assert conn.execute("SELECT count(*) FROM nobroker").fetchone()[0] == 1000
    finally:
        cli("start", "-p", q3.name)
    def status():
        return BrokerClient(q3.broker_addr).status()
    wait_until(lambda: status()["timelines"] >= 1, 10, "the safekeepers to publish to the restarted broker")
    v0 = status()["version"]
    wait_until(lambda: status()["version"] >= v0 + 3, 10, "publishing to go on")


def test_safekeeper_count_is_a_project_setting(q3, cli):
    rc, _, err = cli("project", "set", "-p", q3.name, "--safekeepers", "5", ok=False)
    assert rc != 0 and "stop the project's daemons first" in err
    cli("init", "--name", "resize", "-o", "json")
    try:
        cli("project", "set", "-p", "resize", "--safekeepers", "3")
        p = load_project("resize")
        assert [s["id"] for s in p.config.safekeepers] == [1, 2, 3]
        tl = p.branch("main").timeline_id
        states = [load(p.safekeeper_dir(i) / "timelines" / tl / "safekeeper.control") for i in (1, 2, 3)]
        assert len({(s.timeline_start_lsn, s.flush_lsn, s.term) for s in states}) == 1
        cli("project", "set", "-p", "resize", "--safekeepers", "1")
        p = load_project("resize")
        assert len(p.config.safekeepers) == 1 and not p.safekeeper_dir(3).exists()
    finally:
        cli("project", "delete", "resize")


def test_interrupted_timeline_deletion_is_finished_at_start(q3, cli):
    """A delete moves the directory aside in one rename; one killed after it is finished, never loaded."""
    ensure_all_safekeepers(q3)
    stop_safekeeper(q3, 3)
    timelines = q3.safekeeper_dir(3) / "timelines"
    grave = timelines / f".deleted-{'0' * 32}-0bad"
    grave.mkdir()
    # What a kill between the rename and the removal leaves: a control file whose WAL is already gone.
    (grave / "safekeeper.control").write_bytes((timelines / tid(q3) / "safekeeper.control").read_bytes())
    start_safekeeper(q3, 3)
    assert not grave.exists()
    wait_until(lambda: caught_up(q3, 3), 15, "sk3 to serve its real timeline again")
    log = (q3.safekeeper_dir(3) / "sk3.log").read_text()
    assert "0" * 32 not in log
