"""Oracle test for branches: a branch at any recorded LSN, mid-record LSN or commit time holds
exactly the rows committed by then; so do branches of branches."""

import json
from datetime import datetime

import pytest
from conftest import commit_history, connect, insert_lsn, running_main

from neonctl.engine.lsn import format_lsn


def _delete_batch_2(conn, i):
    if i == 4:
        conn.execute("DELETE FROM oracle WHERE batch = 2")


@pytest.fixture(scope="module")
def workload(pg18):
    """Commit batches one transaction at a time (batch 4 also deletes batch 2), recording (insert LSN, wall time,
    rows) after each."""
    with running_main(pg18):
        with connect(pg18) as conn:
            points = commit_history(conn, "oracle", 5, lambda i: (i * 1000, i * 1000 + i * 10), _delete_batch_2)
            # something after the last point, so mid-record LSNs exist past it
            conn.execute("INSERT INTO oracle VALUES (999999, 99)")
        yield points


def _rows_on(cli, project, parent_ref, name, *extra):
    cli("branch", "create", "--name", name, "--parent", parent_ref, *extra, "-p", project.name)
    cli("endpoint", "start", name, "-p", project.name)
    try:
        with connect(project, name) as conn:
            exists = conn.execute("SELECT to_regclass('oracle') IS NOT NULL").fetchone()[0]
            return conn.execute("SELECT count(*) FROM oracle").fetchone()[0] if exists else None
    finally:
        cli("endpoint", "stop", name, "-p", project.name)


def test_branch_at_each_recorded_lsn_mid_record_and_time(pg18, cli, workload):
    for k, (lsn, ts, rows) in enumerate(workload):
        if k % 2 == 1:
            continue
        assert _rows_on(cli, pg18, f"main@{format_lsn(lsn)}", f"o_lsn{k}") == rows
        # an LSN inside the next record means "records ending at or before it": the same state
        assert _rows_on(cli, pg18, f"main@{format_lsn(lsn + 3)}", f"o_mid{k}") == rows
        assert _rows_on(cli, pg18, f"main@{ts.isoformat()}", f"o_ts{k}") == rows


def test_branch_of_branch(pg18, cli, workload):
    lsn2, _, rows2 = workload[2]
    cli("branch", "create", "--name", "child", "--parent", f"main@{format_lsn(lsn2)}", "-p", pg18.name)
    cli("endpoint", "start", "child", "-p", pg18.name)
    with connect(pg18, "child") as conn:
        conn.execute("INSERT INTO oracle VALUES (-1, -1), (-2, -2)")
        grand_lsn = insert_lsn(conn)
        conn.execute("INSERT INTO oracle VALUES (-3, -3)")
    # the grandchild sees the child's own writes up to its branch point, and the parent's history below
    assert _rows_on(cli, pg18, f"child@{format_lsn(grand_lsn)}", "grandchild") == rows2 + 2
    with connect(pg18, "child") as conn:
        assert conn.execute("SELECT count(*) FROM oracle").fetchone()[0] == rows2 + 3
    cli("endpoint", "stop", "child", "-p", pg18.name)
    # the parent (still running) never saw the child's writes
    with connect(pg18) as conn:
        assert conn.execute("SELECT count(*) FROM oracle WHERE id < 0").fetchone()[0] == 0
    rc, out, _ = cli("branch", "list", "-p", pg18.name, "-o", "json")
    tree = {b["name"]: b for b in json.loads(out)}
    assert tree["grandchild"]["parent"] == "child" and tree["child"]["parent"] == "main"


def _err(cli, *args):
    rc, _, err = cli(*args, ok=False)
    assert rc != 0
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: "), err
    return lines[-1]


def test_branch_bad_input_changes_nothing(pg18, cli, workload):
    before = (pg18.dir / "project.json").read_text()
    p = ["-p", pg18.name]
    assert "invalid LSN" in _err(cli, "branch", "create", "--name", "x", "--lsn", "12345", *p)
    assert "invalid point" in _err(cli, "branch", "create", "--name", "x", "--parent", "main@yesterday", *p)
    assert "past the parent's head" in _err(cli, "branch", "create", "--name", "x", "--lsn", "FF/0", *p)
    assert "in the future" in _err(cli, "branch", "create", "--name", "x", "--timestamp", "2999-01-01T00:00:00Z", *p)
    assert "before the project's history" in _err(cli, "branch", "create", "--name", "x", "--timestamp",
                                                  "2001-01-01T00:00:00Z", *p)
    assert "no time zone" in _err(cli, "branch", "create", "--name", "x", "--timestamp", "2026-01-01T00:00:00", *p)
    assert "does not exist" in _err(cli, "branch", "create", "--name", "x", "--parent", "nope", *p)
    assert "invalid branch name" in _err(cli, "branch", "create", "--name", "a/b", *p)
    assert "invalid branch name" in _err(cli, "branch", "create", "--name", "a b?", *p)
    assert "default branch" in _err(cli, "branch", "delete", "main", *p)
    assert (pg18.dir / "project.json").read_text() == before
    cli("branch", "create", "--name", "dup", *p)
    assert "already exists" in _err(cli, "branch", "create", "--name", "dup", *p)
    rc, out, err = cli("branch", "create", "--name", "dup", "--if-not-exists", "-o", "json", *p)
    assert json.loads(out)["name"] == "dup" and "already exists" in err
    cli("branch", "create", "--name", "dupchild", "--parent", "dup", *p)
    assert "child branches" in _err(cli, "branch", "delete", "dup", *p)
    cli("branch", "delete", "dupchild", *p)
    cli("branch", "delete", "dup", *p)
    assert "dup" not in json.loads((pg18.dir / "project.json").read_text())["branches"]


def test_lsn_timestamp_mapping(pg18, cli, workload):
    lsn, ts, _ = workload[3]
    rc, out, _ = cli("lsn", "main", "--timestamp", ts.isoformat(), "-o", "json", "-p", pg18.name)
    assert json.loads(out)["lsn"] == format_lsn(lsn)
    rc, out, _ = cli("lsn", "main", "--lsn", format_lsn(lsn), "-o", "json", "-p", pg18.name)
    commit_time = datetime.fromisoformat(json.loads(out)["commit_time"])
    assert workload[2][1] < commit_time <= ts
