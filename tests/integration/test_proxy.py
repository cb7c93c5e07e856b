"""The proxy, end to end: real clients (psycopg, psql, pgbench) through one address to any branch.

Routing by `options=endpoint=...` and by the `endpoint=B;PASSWORD` password form, SCRAM against the
project's roles, wake on connect (shared by concurrent clients), scale to zero, cancel, time travel,
pooled connections through the system's PgBouncer, and the faults the proxy must survive.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from conftest import connect, insert_lsn, running_main
from waiting import wait_until

from neonctl.cli import main as cli_main
from neonctl.engine.compute.endpoint import list_endpoints, postgres_pid, read_state
from neonctl.engine.connection import direct_uri, proxy_uri
from neonctl.engine.lsn import format_lsn
from neonctl.engine.roles import get_role


def q(uri: str, sql: str, **kw):
    with psycopg.connect(uri, autocommit=True, connect_timeout=30, **kw) as c:
        cur = c.execute(sql)
        return cur.fetchall() if cur.description else []


def running(project, name: str) -> bool:
    return any(st.name == name and s == "running" for st, s in list_endpoints(project))


@pytest.fixture(scope="module")
def proxied(pg18):
    """pg18 with a table on main and a branch `px` (no compute yet) for the proxy tests."""
    with running_main(pg18):
        with connect(pg18) as conn:
            conn.execute("DROP TABLE IF EXISTS px_t")
            conn.execute("CREATE TABLE px_t (id int)")
            conn.execute("INSERT INTO px_t SELECT generate_series(1, 10)")
            lsn = insert_lsn(conn)
            conn.execute("INSERT INTO px_t SELECT generate_series(11, 15)")
        assert cli_main(["branch", "create", "--name", "px", "-p", pg18.name, "-o", "json"]) == 0
        yield pg18, lsn
        for st, _ in list_endpoints(pg18):
            if st.name != "main":
                cli_main(["endpoint", "stop", st.name, "-p", pg18.name, "-o", "json"])
        cli_main(["branch", "delete", "px", "--force", "-p", pg18.name, "-o", "json"])


def test_routes_by_endpoint_option_and_wakes_on_connect(proxied, cli):
    p, _ = proxied
    assert not running(p, "px")
    rc, out, _ = cli("connection-string", "px", "-p", p.name)
    uri = out.strip()
    assert f"127.0.0.1:{p.config.proxy_port}" in uri and "options=endpoint%3Dpx" in uri
    assert q(uri, "SELECT count(*) FROM px_t") == [(15,)]
    assert running(p, "px")  # woke on connect
    assert q(proxy_uri(p, "main"), "SELECT count(*) FROM px_t") == [(15,)]


def test_password_hack_and_default_branch(proxied):
    p, _ = proxied
    pw = get_role(p, "postgres").password
    base = f"host=127.0.0.1 port={p.config.proxy_port} user=postgres dbname=postgres sslmode=disable"
    assert q(f"{base} password=endpoint=main;{pw}", "SELECT 1") == [(1,)]
    assert q(f"{base} password=endpoint=main${pw}", "SELECT 1") == [(1,)]
    assert q(f"{base} password={pw}", "SELECT current_database()") == [("postgres",)]  # default branch


def test_wrong_password_unknown_branch_unknown_role_start_nothing(proxied, cli):
    p, _ = proxied
    cli("branch", "create", "--name", "px-cold", "-p", p.name)
    try:
        good = proxy_uri(p, "px-cold")
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            q(good.replace(get_role(p, "postgres").password, "wrong-password"), "SELECT 1")
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            q(good.replace("postgres:", "nosuchrole:", 1), "SELECT 1")
        # the SQLSTATE on the wire (libpq does not expose it for a failed connection)
        body = struct.pack("!I", 196608) + b"user\0postgres\0\0"
        pw = b"endpoint=px-cold;wrong\0"
        ans = _raw(p, struct.pack("!I", len(body) + 4) + body + b"p" + struct.pack("!I", len(pw) + 4) + pw)
        assert ans[:9] == b"R\0\0\0\x08\0\0\0\x03" and b"C28P01" in ans
        with pytest.raises(psycopg.OperationalError, match="does not exist"):
            q(proxy_uri(p, "no-such-branch"), "SELECT 1")
        assert not running(p, "px-cold"), "a refused client must not start a compute"
    finally:
        cli("branch", "delete", "px-cold", "-p", p.name)


def test_concurrent_connections_share_one_wake(proxied, cli):
    p, _ = proxied
    cli("branch", "create", "--name", "px-many", "-p", p.name)
    try:
        uri = proxy_uri(p, "px-many")
        with ThreadPoolExecutor(8) as ex:
            res = list(ex.map(lambda _: q(uri, "SELECT count(*) FROM px_t")[0][0], range(8)))
        assert res == [15] * 8
        assert [st.name for st, _ in list_endpoints(p)].count("px-many") == 1
    finally:
        cli("endpoint", "stop", "px-many", "-p", p.name)
        cli("branch", "delete", "px-many", "-p", p.name)


def test_time_travel_through_the_proxy(proxied, cli):
    p, lsn = proxied
    rc, out, _ = cli("connection-string", f"main@{format_lsn(lsn)}", "-o", "json", "-p", p.name)
    res = json.loads(out)
    assert res["read_only"] and res["endpoint"].startswith("main@")
    assert q(res["connection_string"], "SELECT count(*) FROM px_t") == [(10,)]
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        q(res["connection_string"], "INSERT INTO px_t VALUES (0)")
    cli("endpoint", "stop", res["endpoint"], "-p", p.name)


def test_time_travel_compute_with_an_older_password(proxied, cli):
    """A read-only compute keeps the roles it started with; the proxy, which reaches computes over TCP with
    the role's password for the kernel's socket shortcut, falls back to the trusted Unix socket."""
    p, _ = proxied
    cli("roles", "create", "tt_user", "-p", p.name)
    try:
        with connect(p) as conn:  # a point where the role exists, with the password it has now
            lsn = insert_lsn(conn)
        at = f"main@{format_lsn(lsn)}"
        rc, out, _ = cli("connection-string", at, "--role", "tt_user", "-o", "json", "-p", p.name)
        assert q(json.loads(out)["connection_string"], "SELECT current_user") == [("tt_user",)]
        rc, out, _ = cli("roles", "reset-password", "tt_user", "-o", "json", "-p", p.name)
        updated = json.loads(out)["computes_updated"]
        assert "main" in updated and not any("@" in e for e in updated)  # not the read-only one
        rc, out, _ = cli("connection-string", at, "--role", "tt_user", "-o", "json", "-p", p.name)
        res = json.loads(out)
        assert q(res["connection_string"], "SELECT current_user, pg_is_in_recovery()") == [("tt_user", True)]
        cli("endpoint", "stop", res["endpoint"], "-p", p.name)
    finally:
        cli("roles", "delete", "tt_user", "-p", p.name)


def test_direct_tcp_needs_the_password(proxied):
    p, _ = proxied
    st = read_state(p, "main")
    with pytest.raises(psycopg.OperationalError, match="password"):
        q(f"host=127.0.0.1 port={st.port} user=postgres dbname=postgres sslmode=disable", "SELECT 1")
    assert q(direct_uri(p, st.port), "SELECT 1") == [(1,)]


def test_cancel_reaches_the_compute(proxied):
    p, _ = proxied
    with psycopg.connect(proxy_uri(p, "main"), autocommit=True) as conn:
        t0 = time.monotonic()
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        assert time.monotonic() - t0 < 10
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on


def test_psql_and_pgbench_through_the_proxy(proxied):
    p, _ = proxied
    rt = p.runtime()
    uri = proxy_uri(p, "main")
    out = subprocess.run([rt.bin("psql"), uri, "-Atc", "SELECT count(*) FROM px_t"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "15", out.stderr
    init = subprocess.run([rt.bin("pgbench"), "-i", "-s", "1", "-q", uri], capture_output=True, text=True,
                          timeout=120)
    assert init.returncode == 0, init.stderr
    run = subprocess.run([rt.bin("pgbench"), "-S", "-c", "4", "-j", "2", "-T", "2", uri], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "number of failed transactions: 0" in run.stdout, run.stderr


def _raw(p, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", p.config.proxy_port), timeout=10) as s:
        s.sendall(payload)
        chunks = []
        try:
            while True:
                b = s.recv(4096)
                if not b:
                    break
                chunks.append(b)
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_bad_input_gets_errors_and_the_proxy_stays_up(proxied):
    p, _ = proxied
    # protocol 2.0
    ans = _raw(p, struct.pack("!II", 8, 2 << 16))
    assert ans[:1] == b"E" and b"C08P01" in ans
    # garbage instead of a startup packet
    ans = _raw(p, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert ans[:1] == b"E" and b"C08P01" in ans
    # disconnect mid-startup and mid-auth
    with socket.create_connection(("127.0.0.1", p.config.proxy_port)) as s:
        s.sendall(struct.pack("!I", 40)[:3])
    with socket.create_connection(("127.0.0.1", p.config.proxy_port)) as s:
        body = struct.pack("!I", 196608) + b"user\0postgres\0options\0endpoint=main\0\0"
        s.sendall(struct.pack("!I", len(body) + 4) + body)
        assert s.recv(1) == b"R"  # asked for SASL; now go away
    assert q(proxy_uri(p, "main"), "SELECT 1") == [(1,)]


def test_two_hundred_concurrent_clients(proxied):
    p, _ = proxied
    uri = proxy_uri(p, "main", pooled=True)  # 200 clients, 16 server connections: PgBouncer's job
    with ThreadPoolExecutor(50) as ex:
        res = list(ex.map(lambda i: q(uri, f"SELECT {i}")[0][0], range(200)))
    assert res == list(range(200))


def test_pooled_connections_go_through_pgbouncer(proxied, cli):
    p, _ = proxied
    rc, out, _ = cli("connection-string", "main", "--pooled", "-p", p.name)
    uri = out.strip()
    assert "endpoint%3Dmain-pooler" in uri
    with psycopg.connect(uri, autocommit=True, prepare_threshold=None) as c:
        assert c.execute("SHOW port").fetchone()[0] == str(read_state(p, "main").port)
        apps = c.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'").fetchone()
        assert apps[0] >= 1


def test_compute_killed_under_a_session_then_woken_fresh(proxied, cli):
    p, _ = proxied
    cli("branch", "create", "--name", "px-kill", "-p", p.name)
    try:
        uri = proxy_uri(p, "px-kill")
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("CREATE TABLE k (v int)")
            conn.execute("INSERT INTO k VALUES (1)")
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            pid = postgres_pid(read_state(p, "px-kill").pgdata)
            os.killpg(pid, signal.SIGKILL)  # the postmaster; backends run in sessions of their own:
            os.kill(backend, signal.SIGKILL)  # this session's too, as a crashed machine would
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        wait_until(lambda: postgres_pid(read_state(p, "px-kill").pgdata) is None, what="compute gone")
        assert q(uri, "SELECT v FROM k") == [(1,)]  # committed row kept; a fresh compute
        assert postgres_pid(read_state(p, "px-kill").pgdata) != pid
    finally:
        cli("endpoint", "stop", "px-kill", "-p", p.name)
        cli("branch", "delete", "px-kill", "-p", p.name)


def test_proxy_restart_keeps_computes(proxied, cli):
    p, _ = proxied
    pid_before = postgres_pid(read_state(p, "main").pgdata)
    proxy = p.daemon("proxy")
    old = proxy.pid()
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: proxy.pid() is None, what="proxy gone")
    assert q(direct_uri(p, read_state(p, "main").port), "SELECT 1") == [(1,)]  # the compute did not notice
    cli("start", "-p", p.name)
    assert proxy.pid() not in (None, old)
    assert q(proxy_uri(p, "main"), "SELECT count(*) FROM px_t") == [(15,)]
    assert postgres_pid(read_state(p, "main").pgdata) == pid_before


def test_scale_to_zero_and_wake_again(proxied, cli):
    p, _ = proxied
    cli("branch", "create", "--name", "px-idle", "--suspend-timeout", "2", "-p", p.name)
    try:
        uri = proxy_uri(p, "px-idle")
        q(uri, "CREATE TABLE s (v int); INSERT INTO s VALUES (7)")
        assert running(p, "px-idle")

        def suspended():
            rc, out, _ = cli("endpoint", "list", "-o", "json", "-p", p.name)
            return any(e["endpoint"] == "px-idle" and e["status"] == "suspended" for e in json.loads(out))

        wait_until(suspended, timeout=30, what="px-idle suspended")
        assert not running(p, "px-idle")
        assert q(uri, "SELECT v FROM s") == [(7,)]  # woke again, data intact
        assert running(p, "px-idle")
    finally:
        cli("endpoint", "stop", "px-idle", "-p", p.name, ok=False)
        cli("branch", "delete", "px-idle", "-p", p.name)


def test_roles_create_reset_delete(proxied, cli):
    p, _ = proxied
    rc, out, _ = cli("roles", "create", "app_user", "-o", "json", "-p", p.name)
    role = json.loads(out)
    assert "main" in role["computes_updated"]
    assert q(role["connection_string"], "SELECT current_user") == [("app_user",)]
    rc, out, _ = cli("roles", "reset-password", "app_user", "-o", "json", "-p", p.name)
    new = json.loads(out)
    assert new["password"] != role["password"]
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        q(role["connection_string"], "SELECT 1")
    assert q(new["connection_string"], "SELECT current_user") == [("app_user",)]
    cli("roles", "delete", "app_user", "-p", p.name)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        q(new["connection_string"], "SELECT 1")
    rc, out, _ = cli("roles", "list", "-o", "json", "-p", p.name)
    assert [r["name"] for r in json.loads(out)] == ["postgres"]
    rc, _, err = cli("roles", "delete", "postgres", "-p", p.name, ok=False)
    assert rc != 0 and "cannot be deleted" in err


def test_secrets_are_private(proxied):
    p, _ = proxied
    f = p.dir / "secrets" / "roles.json"
    assert f.stat().st_mode & 0o777 == 0o600 and f.parent.stat().st_mode & 0o777 == 0o700
    assert os.stat(read_state(p, "main").socket_dir).st_mode & 0o777 == 0o700
