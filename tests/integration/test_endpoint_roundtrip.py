"""The walking skeleton's promise: a compute's data directory is a cache; storage has every commit."""

from pathlib import Path

from conftest import connect

from neonctl.engine.compute.endpoint import read_state


def _snapshot(conn):
    return conn.execute("SELECT count(*), coalesce(sum(hashtext(v)), 0) FROM rt").fetchone()


def test_write_stop_start_identical(any_project, cli):
    name = any_project.name
    cli("endpoint", "start", "main", "-p", name)
    with connect(any_project) as conn:
        conn.execute("DROP TABLE IF EXISTS rt")
        conn.execute("CREATE TABLE rt (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO rt SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
        conn.execute("UPDATE rt SET v = v || 'x' WHERE id % 7 = 0")
        conn.execute("DELETE FROM rt WHERE id % 11 = 0")
        conn.execute("CREATE INDEX rt_v ON rt (v)")
        before = _snapshot(conn)
        version = conn.execute("SHOW server_version_num").fetchone()[0]
    assert int(version) // 10000 == any_project.config.pg_version
    pgdata = Path(read_state(any_project, "main").pgdata)
    cli("endpoint", "stop", "main", "-p", name)
    assert not pgdata.exists(), "endpoint stop must delete the data directory"
    cli("endpoint", "start", "main", "-p", name)
    with connect(any_project) as conn:
        assert _snapshot(conn) == before
        # the index is consistent with the heap after replay
        conn.execute("SET enable_seqscan = off")
        n = conn.execute("SELECT count(*) FROM rt WHERE v > ''").fetchone()[0]
        assert n == before[0]
        # and the rebuilt compute accepts new writes, which survive the next cycle too
        conn.execute("INSERT INTO rt VALUES (1000001, 'after restart')")
    cli("endpoint", "stop", "main", "-p", name)
    cli("endpoint", "start", "main", "-p", name)
    with connect(any_project) as conn:
        assert conn.execute("SELECT v FROM rt WHERE id = 1000001").fetchone() == ("after restart",)
    cli("endpoint", "stop", "main", "-p", name)
