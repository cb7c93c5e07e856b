"""Warm start (issue 16's first step): the second start of a branch takes the directory its compute stopped
cleanly in, unchanged, when that is exactly the branch's state - and only then. Every start is checked
against the rows committed, and the warm result against a full materialisation of the same point."""

from __future__ import annotations

import json

from conftest import connect, materialise_next_start, start_how

from neonctl.engine.compute import dir_pool
from neonctl.engine.compute.endpoint import directory_pool


def _digest(project, branch: str) -> tuple:
    with connect(project, branch) as conn:
        return conn.execute("SELECT count(*), coalesce(sum(hashtext(v)), 0) FROM wt").fetchone()


def _start(cli, project, branch: str) -> bool:
    """Start the branch's compute; True when the stopped directory was reused as it was."""
    return start_how(cli, project, branch) == "reused"


def test_second_start_reuses_the_stopped_directory_and_matches_a_full_materialisation(pg18, cli):
    p = ["-p", pg18.name]
    cli("branch", "create", "--name", "warm1", *p)
    materialise_next_start(pg18)  # (else it may take main's stopped directory: it starts at main's head)
    assert not _start(cli, pg18, "warm1")
    with connect(pg18, "warm1") as conn:
        conn.execute("CREATE TABLE wt (id int, v text)")
        conn.execute("INSERT INTO wt SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
        conn.execute("CREATE UNLOGGED TABLE wu (id int)")
        conn.execute("INSERT INTO wu VALUES (1), (2)")
    committed = _digest(pg18, "warm1")
    cli("endpoint", "stop", "warm1", *p)
    assert _start(cli, pg18, "warm1")
    assert _digest(pg18, "warm1") == committed
    with connect(pg18, "warm1") as conn:
        # as after a materialisation (crash recovery): unlogged relations come back empty
        assert conn.execute("SELECT count(*) FROM wu").fetchone()[0] == 0
        conn.execute("UPDATE wt SET v = v || 'x' WHERE id % 7 = 0")
        conn.execute("INSERT INTO wt VALUES (-1, 'after the warm start')")
    committed = _digest(pg18, "warm1")
    cli("endpoint", "stop", "warm1", *p)
    assert _start(cli, pg18, "warm1")  # again: writes after a warm start stream to the safekeepers as usual
    warm = _digest(pg18, "warm1")
    assert warm == committed
    # the oracle: the same point built the full way (image + WAL replay) holds the same rows
    cli("endpoint", "stop", "warm1", "--immediate", *p)
    assert not _start(cli, pg18, "warm1")  # an immediate stop is not a clean shutdown
    assert _digest(pg18, "warm1") == warm
    cli("endpoint", "stop", "warm1", *p)


def test_a_directory_not_exactly_the_target_is_never_reused(pg18, cli):
    p = ["-p", pg18.name]
    cli("project", "set", "--pool-size", "1", *p)  # one kept directory: each stop replaces the last one
    try:
        _not_exactly_the_target(pg18, cli, p)
    finally:
        cli("project", "set", "--pool-size", "2", *p)


def _not_exactly_the_target(pg18, cli, p):
    cli("branch", "create", "--name", "warm2", *p)
    cli("endpoint", "start", "warm2", *p)
    with connect(pg18, "warm2") as conn:
        conn.execute("CREATE TABLE wt (id int, v text)")
        conn.execute("INSERT INTO wt SELECT g, 'a' FROM generate_series(1, 100) g")
    cli("branch", "create", "--name", "warm2b", "--parent", "warm2", *p)
    cli("endpoint", "stop", "warm2", *p)
    # a sibling (branched before the stop) is another state: not reused, and its rows are its own
    assert not _start(cli, pg18, "warm2b")
    assert _digest(pg18, "warm2b")[0] == 100
    cli("endpoint", "stop", "warm2b", *p)
    slot = dir_pool.slots(directory_pool(pg18))[0]  # warm2b's, the newest
    pool, record = slot / "pgdata", slot / dir_pool.RECORD
    # a record naming another timeline is not believed...
    good = json.loads(record.read_text())
    record.write_text(json.dumps({**good, "timeline_id": pg18.branch("warm2").timeline_id}))
    assert not _start(cli, pg18, "warm2")
    cli("endpoint", "stop", "warm2", *p)
    _, _, err = cli("endpoint", "start", "warm2", *p)  # (the control: its own clean stop is reused)
    assert "reused (no restore, no replay)" in err, (err, [dir_pool.read_record(s) for s in
                                                         dir_pool.slots(directory_pool(pg18))])
    cli("endpoint", "stop", "warm2", *p)
    # ...nor a directory whose own copy of the shutdown checkpoint differs from storage's by one bit
    pool = dir_pool.slots(directory_pool(pg18))[0] / "pgdata"  # warm2's, just stopped
    ctl = (pool / "global" / "pg_control").read_bytes()
    checkpoint = int.from_bytes(ctl[32:40], "little")
    seg = 16 << 20
    wal = next((pool / "pg_wal").glob(f"*{checkpoint // seg:08X}"))
    with open(wal, "r+b") as f:
        f.seek(checkpoint % seg + 30)  # inside the record, past its header
        b = f.read(1)
        f.seek(checkpoint % seg + 30)
        f.write(bytes([b[0] ^ 0x01]))
    assert not _start(cli, pg18, "warm2")
    with connect(pg18, "warm2") as conn:
        assert conn.execute("SELECT count(*) FROM wt").fetchone()[0] == 100
    cli("endpoint", "stop", "warm2", *p)
