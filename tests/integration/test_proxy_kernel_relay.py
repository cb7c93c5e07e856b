"""The proxy's kernel relay (eBPF sockmap, `proxy/kernel_relay.py`, and the socket shortcut, `proxy/shortcut.py`)
with real clients and a real compute.

Each test checks the proxy's /v1/status counters, so a pass means the kernel really carried the session. The
test machine must let a process load the relay (root with CAP_BPF on x86-64): where it cannot, these tests
fail rather than skip, as the PgBouncer and Node tests do without their parts.
"""

from __future__ import annotations

import io
import os
import platform
import signal
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from conftest import connect, running_main
from waiting import wait_until

from neonctl.engine import client
from neonctl.engine.compute.endpoint import postgres_pid, read_state
from neonctl.engine.connection import proxy_uri
from neonctl.engine.proxy.kernel_relay import ENV_SWITCH


def _kernel_relay_possible() -> bool:
    """Whether this machine lets a process like the proxy load the relay (root with CAP_BPF on x86-64; a
    container may refuse bpf(2) even to root). Probed once, in this process: the proxy runs as we do."""
    if os.geteuid() != 0 or platform.machine() != "x86_64":
        return False
    from neonctl.engine.proxy.kernel_relay import open_kernel_relay  # noqa: PLC0415

    relay = open_kernel_relay()
    if relay is None:
        return False
    relay.close()
    return True


KERNEL_RELAY_POSSIBLE = _kernel_relay_possible()


def relay_status(p) -> dict:
    return client.status("proxy", p.proxy_http_addr)["kernel_relay"]


def joined(p) -> int:
    return relay_status(p)["joined"]


def shortcut_joined(p) -> int:
    return relay_status(p)["shortcut_joined"]


@pytest.fixture(scope="module")
def relayed(pg18):
    """pg18 with main running and its proxy relaying in the kernel (restarted if an earlier module left it
    in userspace)."""
    with running_main(pg18):
        with connect(pg18) as conn:
            conn.execute("DROP TABLE IF EXISTS kr_t")
            conn.execute("CREATE TABLE kr_t (id int, pad text)")
        st = relay_status(pg18)
        assert st["on"] is KERNEL_RELAY_POSSIBLE, st
        yield pg18


@pytest.fixture
def kernel(relayed):
    if not KERNEL_RELAY_POSSIBLE:  # a part of the test machine, like PgBouncer and Node: fail, do not skip
        pytest.fail("the kernel relay cannot load here: the tests need root with CAP_BPF on x86-64 "
                    "(the userspace fallback is checked by test_switch_off_...)")
    return relayed


def _restart_proxy(p, cli) -> None:
    proxy = p.daemon("proxy")
    old = proxy.pid()
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: proxy.pid() is None, what="proxy gone")
    cli("start", "-p", p.name)
    assert proxy.pid() not in (None, old)


def test_queries_big_results_and_copy_are_byte_exact(kernel):
    p = kernel
    before, direct_before = joined(p), shortcut_joined(p)
    with psycopg.connect(proxy_uri(p, "main"), autocommit=True) as c, connect(p) as d:
        assert joined(p) == before + 1
        assert shortcut_joined(p) == direct_before + 1  # the client's and the backend's sockets joined
        assert relay_status(p)["sessions"] >= 1
        for i in range(2000):
            assert c.execute("SELECT %s::int, md5(%s::text)", (i, i)).fetchone() == (i, _md5(i))
        big = "SELECT string_agg(md5(g::text) || chr(32 + g % 90), '' ORDER BY g) FROM generate_series(1, 60000) g"
        got = c.execute(big).fetchone()[0]
        assert len(got) > 1_900_000 and got == d.execute(big).fetchone()[0]
        rows = c.execute("SELECT g, repeat(chr(65 + g % 26), g % 300) FROM generate_series(1, 20000) g").fetchall()
        assert rows == [(g, chr(65 + g % 26) * (g % 300)) for g in range(1, 20001)]
        # COPY in: 3 MB through the relay; COPY out: the same bytes back
        data = b"".join(b"%d\t%s\n" % (i, os.urandom(60).hex().encode()) for i in range(25000))
        c.execute("TRUNCATE kr_t")
        with c.cursor().copy("COPY kr_t FROM STDIN") as cp:
            for off in range(0, len(data), 65536):
                cp.write(data[off:off + 65536])
        out = io.BytesIO()
        with c.cursor().copy("COPY (SELECT * FROM kr_t ORDER BY id) TO STDOUT") as cp:
            for chunk in cp:
                out.write(chunk)
        assert out.getvalue() == data
        assert d.execute("SELECT count(*), sum(length(pad)) FROM kr_t").fetchone() == (25000, 25000 * 120)


def _md5(i: int) -> str:
    import hashlib  # noqa: PLC0415

    return hashlib.md5(str(i).encode()).hexdigest()


def _backends(p) -> set[int]:
    with connect(p) as d:
        return {r[0] for r in d.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'"
                                        " AND pid <> pg_backend_pid()").fetchall()}


def test_client_gone_abruptly_ends_its_backend(kernel):
    p = kernel
    conn = psycopg.connect(proxy_uri(p, "main"), autocommit=True)
    backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert backend in _backends(p)
    assert relay_status(p)["sessions"] >= 1
    assert client.status("proxy", p.proxy_http_addr)["sessions"]["main"] >= 1
    s = socket.socket(fileno=os.dup(conn.fileno()))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST, no Terminate
    s.close()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, conn.fileno())  # libpq's fd now points nowhere: the socket's last reference is gone
    os.close(null)
    wait_until(lambda: backend not in _backends(p), timeout=10, what="the backend to end with its client")
    wait_until(lambda: relay_status(p)["sessions"] == 0, timeout=10, what="the relay to forget the session")
    assert client.status("proxy", p.proxy_http_addr)["sessions"].get("main", 0) == 0  # what suspend.py counts
    conn.close()


def test_fifty_concurrent_sessions(kernel):
    p = kernel
    before = joined(p)
    uri = proxy_uri(p, "main")
    barrier = threading.Barrier(50)
    seen = []

    def one(i: int) -> int:
        with psycopg.connect(uri, autocommit=True, connect_timeout=60) as c:
            barrier.wait(timeout=60)
            seen.append(relay_status(p)["sessions"])
            total = 0
            for j in range(50):
                total += c.execute("SELECT %s::int * %s::int", (i, j)).fetchone()[0]
            barrier.wait(timeout=60)
            return total

    with ThreadPoolExecutor(50) as ex:
        res = list(ex.map(one, range(50)))
    assert res == [i * sum(range(50)) for i in range(50)]
    assert joined(p) - before == 50 and max(seen) >= 50
    wait_until(lambda: relay_status(p)["sessions"] == 0, timeout=10, what="all sessions ended")


def test_cancel_request_still_reaches_the_backend(kernel):
    p = kernel
    before = joined(p)
    with psycopg.connect(proxy_uri(p, "main"), autocommit=True) as conn:
        assert joined(p) == before + 1
        t0 = time.monotonic()
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        assert time.monotonic() - t0 < 10
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_pooled_sessions_are_relayed_too(kernel):
    p = kernel
    before, direct_before = joined(p), shortcut_joined(p)
    with psycopg.connect(proxy_uri(p, "main", pooled=True), autocommit=True, prepare_threshold=None) as c:
        assert c.execute("SELECT sum(g) FROM generate_series(1, 1000) g").fetchone() == (500500,)
        assert joined(p) == before + 1
        assert shortcut_joined(p) == direct_before  # PgBouncer's Unix socket: the sockmap relay carries it


def test_compute_killed_closes_the_client_and_the_next_wakes_a_fresh_one(kernel, cli):
    p = kernel
    cli("branch", "create", "--name", "kr-kill", "-p", p.name)
    try:
        uri = proxy_uri(p, "kr-kill")
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("CREATE TABLE k (v int)")
            conn.execute("INSERT INTO k VALUES (1)")
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            before = relay_status(p)["sessions"]
            assert before >= 1
            pid = postgres_pid(read_state(p, "kr-kill").pgdata)
            os.killpg(pid, signal.SIGKILL)
            os.kill(backend, signal.SIGKILL)
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
            wait_until(lambda: relay_status(p)["sessions"] == before - 1, timeout=10, what="the session closed")
        wait_until(lambda: postgres_pid(read_state(p, "kr-kill").pgdata) is None, what="compute gone")
        n = joined(p)
        assert psycopg.connect(uri, autocommit=True).execute("SELECT v FROM k").fetchall() == [(1,)]
        assert postgres_pid(read_state(p, "kr-kill").pgdata) not in (None, pid)
        assert joined(p) == n + 1
    finally:
        cli("endpoint", "stop", "kr-kill", "-p", p.name, ok=False)
        cli("branch", "delete", "kr-kill", "-p", p.name)


def test_proxy_killed_and_restarted(kernel, cli):
    p = kernel
    conn = psycopg.connect(proxy_uri(p, "main"), autocommit=True)
    backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    _restart_proxy(p, cli)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")  # the proxy's sockets died with it
    conn.close()
    wait_until(lambda: backend not in _backends(p), timeout=10, what="the orphaned backend to end")
    fresh = {"on": True, "sessions": 0, "joined": 0, "shortcut": True, "shortcut_joined": 0}
    assert relay_status(p) == fresh
    with psycopg.connect(proxy_uri(p, "main"), autocommit=True) as c:
        assert c.execute("SELECT 42").fetchone() == (42,)
        assert relay_status(p) == {**fresh, "sessions": 1, "joined": 1, "shortcut_joined": 1}


def test_switch_off_relays_in_userspace(relayed, cli, monkeypatch):
    p = relayed
    monkeypatch.setenv(ENV_SWITCH, "0")
    _restart_proxy(p, cli)
    try:
        assert relay_status(p)["on"] is False
        with psycopg.connect(proxy_uri(p, "main"), autocommit=True) as c:
            big = "SELECT string_agg(md5(g::text), '') FROM generate_series(1, 40000) g"
            assert len(c.execute(big).fetchone()[0]) == 40000 * 32
        assert relay_status(p) == {"on": False, "sessions": 0, "joined": 0, "shortcut": False, "shortcut_joined": 0}
    finally:
        monkeypatch.delenv(ENV_SWITCH)
        _restart_proxy(p, cli)
    assert relay_status(p)["on"] is KERNEL_RELAY_POSSIBLE


def test_sockmap_switch_relays_through_the_proxys_sockets(kernel, cli, monkeypatch):
    p = kernel
    monkeypatch.setenv(ENV_SWITCH, "sockmap")
    _restart_proxy(p, cli)
    try:
        with psycopg.connect(proxy_uri(p, "main"), autocommit=True) as c:
            big = "SELECT string_agg(md5(g::text), '' ORDER BY g) FROM generate_series(1, 40000) g"
            assert c.execute(big).fetchone()[0] == "".join(_md5(g) for g in range(1, 40001))
            st = relay_status(p)
            assert (st["joined"], st["shortcut"], st["shortcut_joined"]) == (1, False, 0)
    finally:
        monkeypatch.delenv(ENV_SWITCH)
        _restart_proxy(p, cli)
    assert relay_status(p)["shortcut"] is True

