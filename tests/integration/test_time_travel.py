"""Read-only time travel: `endpoint start B --lsn|--timestamp` and `connection-string B@TS` give a hot standby
that shows exactly the rows committed by that point, refuses writes, and leaves the branch's writer alone."""

import json

import psycopg
import pytest
from conftest import commit_history, connect, running_main

from neonctl.engine.compute.endpoint import list_endpoints, read_state
from neonctl.engine.lsn import format_lsn, parse_lsn
from neonctl.engine.safekeeper.client import SafekeeperClient


@pytest.fixture(scope="module")
def history(pg18):
    """Batches committed one transaction at a time: (insert LSN, wall time, row count) after each."""
    with running_main(pg18):
        with connect(pg18) as conn:
            points = commit_history(conn, "tt", 4, lambda i: (i * 100, i * 100 + i))
        yield points


def _count(conn_str):
    with psycopg.connect(conn_str, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM tt").fetchone()[0]


def _refuses_writes(conn_str):
    with psycopg.connect(conn_str, autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="read-only"):
            conn.execute("INSERT INTO tt VALUES (-1, -1)")


def test_endpoint_at_lsn_is_read_only_and_exact(pg18, cli, history):
    lsn, _, rows = history[1]
    p = ["-p", pg18.name]
    # an LSN inside the next record means "records ending at or before it": the same point
    rc, out, err = cli("endpoint", "start", "main", "--lsn", format_lsn(lsn + 3), "-o", "json", *p)
    ep = json.loads(out)
    assert ep["mode"] == "read-only" and ep["branch"] == "main"
    assert ep["endpoint"] == f"main@{ep['start_lsn']}" and lsn <= parse_lsn(ep["start_lsn"]) <= lsn + 3
    assert ep["port"] != read_state(pg18, "main").port
    assert _count(ep["connection_string"]) == rows
    _refuses_writes(ep["connection_string"])
    # the safekeepers still follow the branch's own compute, which still commits (no synchronous standby here)
    tl = pg18.branch("main").timeline_id
    for i, addr in pg18.safekeeper_addrs().items():
        assert (
            SafekeeperClient(i, addr).timeline(tl)["compute"]["port"] == read_state(pg18, "main").port
        )
    with connect(pg18) as conn:
        conn.execute("INSERT INTO tt VALUES (-5, -5)")
        conn.execute("DELETE FROM tt WHERE id = -5")
    assert _count(ep["connection_string"]) == rows, "a time-travel endpoint never moves"
    rc, out, _ = cli("endpoint", "list", "-o", "json", *p)
    assert {e["endpoint"]: e["mode"] for e in json.loads(out)} == {"main": "read-write", ep["endpoint"]: "read-only"}
    assert "already running" in cli("endpoint", "start", ep["endpoint"], *p, ok=False)[2]
    cli("endpoint", "stop", ep["endpoint"], *p)
    assert [st.name for st, _ in list_endpoints(pg18)] == ["main"]


def test_connection_string_at_timestamp_starts_one_once(pg18, cli, history):
    _, ts, rows = history[2]
    p = ["-p", pg18.name]
    rc, out, err = cli("connection-string", f"main@{ts.isoformat()}", "--direct", *p)
    conn_str = out.strip()
    assert conn_str.startswith("postgresql://") and "started read-only time-travel endpoint" in err
    assert _count(conn_str) == rows
    _refuses_writes(conn_str)
    rc, out, err = cli("cs", f"main@{ts.isoformat()}", "--direct", "-o", "json", *p)  # the same point: reused
    res = json.loads(out)
    assert res["connection_string"] == conn_str and res["read_only"] and "started" not in err
    cli("endpoint", "stop", f"main@{ts.isoformat()}", *p)
    assert [st.name for st, _ in list_endpoints(pg18)] == ["main"]


def _err(cli, *args):
    rc, _, err = cli(*args, ok=False)
    lines = err.strip().splitlines()
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_time_travel_bad_input(pg18, cli, history):
    p = ["-p", pg18.name]
    assert "past the head" in _err(cli, "endpoint", "start", "main", "--lsn", "FF/0", *p)
    assert "in the future" in _err(cli, "connection-string", "main@2999-01-01T00:00:00Z", *p)
    assert "not both" in _err(
        cli, "endpoint", "start", "main", "--lsn", "0/1", "--timestamp", history[0][1].isoformat(), *p
    )
    assert "given twice" in _err(cli, "endpoint", "start", "main@0/1", "--lsn", "0/1", *p)
    assert "does not exist" in _err(cli, "connection-string", "nope@0/1", *p)
    assert "before the project's history" in _err(cli, "cs", "main@2001-01-01T00:00:00Z", *p)
    assert [st.name for st, _ in list_endpoints(pg18)] == ["main"]
