"""The proxy against the same compute reached directly, in one run: throughput, connection set-up, cold start.

1. pgbench -S (select-only), --clients clients, --seconds each, over --rounds rounds (the order of the
   sides rotating): direct, and through the proxy with each of its relays - "shortcut", as it starts by
   default (the kernel's socket shortcut joining the client's and the backend's sockets, proxy/shortcut.py),
   "sockmap" (the sk_skb relay through the proxy's own sockets alone, NEONCTL_PROXY_KERNEL_RELAY=sockmap)
   and "userspace" (NEONCTL_PROXY_KERNEL_RELAY=0); TPS through the proxy / TPS direct for each relay
   (target >= 0.8). A relay the machine cannot set up (not root, not x86-64, no cgroup v2) is left out.
2. Connection set-up: --connects sequential connect + `SELECT 1` + close with psycopg (SCRAM both ways):
   median through the proxy / median direct (target <= 2).
3. Cold start: a branch of a --size-mb database, suspended by the proxy; the time from connect to the first
   row of a query through the proxy, median of --cold-reps (target <= 1 s; Neon publishes "a few hundred ms").

    python benchmarks/bench_proxy.py [--quick] [--json]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BenchEnv,
    bench_parser,
    client_env,
    log,
    median,
    parse_pgbench,
    run_benchmark,
)

from neonctl.engine import client  # noqa: E402
from neonctl.engine.branches import create_branch  # noqa: E402
from neonctl.engine.compute.endpoint import list_endpoints, read_state, start_endpoint  # noqa: E402
from neonctl.engine.compute.scale_to_zero import suspended_endpoints  # noqa: E402
from neonctl.engine.connection import direct_uri, proxy_uri  # noqa: E402
from neonctl.engine.proxy.kernel_relay import ENV_SWITCH  # noqa: E402
from neonctl.engine.timepoint import TimePoint  # noqa: E402


def pgbench(rt, args: list[str], uri: str, timeout: float) -> str:
    proc = subprocess.run([rt.bin("pgbench"), *args, uri], capture_output=True, text=True, env=client_env(),
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
    return proc.stdout + proc.stderr


def _connect_ms(uri: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        with psycopg.connect(uri, autocommit=True) as c:
            c.execute("SELECT 1").fetchone()
        out.append((time.perf_counter() - t) * 1000)
    return out


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def relay_status(p) -> dict:
    return client.status("proxy", p.proxy_http_addr)["kernel_relay"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(p, limit: float = 90.0) -> None:
    """Wait until the project's daemons are idle (the pageserver ingests pgbench -i's WAL for a while,
    which would slow whichever side ran first)."""
    pids = [pid for pid in (d.pid() for d in p.daemons()) if pid is not None]
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = sum(cpu_seconds(pid) for pid in pids)
        time.sleep(2)
        busy = (sum(cpu_seconds(pid) for pid in pids) - before) / 2
        if busy < 0.15:  # idle daemons poll a little
            return
        log(f"waiting for the daemons to settle ({busy:.0%} CPU)")


RELAYS = {  # side -> (NEONCTL_PROXY_KERNEL_RELAY for the proxy, what /v1/status must then say)
    "shortcut": (None, {"on": True, "shortcut": True}),
    "sockmap": ("sockmap", {"on": True, "shortcut": False}),
    "userspace": ("0", {"on": False, "shortcut": False}),
}


def _relay_is(p, side: str) -> bool:
    st = relay_status(p)
    return all(st[k] == v for k, v in RELAYS[side][1].items())


def use_relay(p, side: str) -> bool:
    """Restart the project's proxy with the relay of `side` (unless it already has it); False if the
    proxy could not set that relay up."""
    if _relay_is(p, side):
        return True
    proxy = p.daemon("proxy")
    proxy.stop()
    switch = RELAYS[side][0]
    if switch is None:
        os.environ.pop(ENV_SWITCH, None)
    else:
        os.environ[ENV_SWITCH] = switch  # inherited by the proxy started next
    proxy.start()
    return _relay_is(p, side)


def body(env: BenchEnv) -> None:
    a = env.args
    p = env.project("proxybench")
    p.set_suspend_timeout(0)
    st = start_endpoint(p, "main")
    direct, proxied = direct_uri(p, st.port), proxy_uri(p, "main")
    log(f"pgbench -i -s {a.scale} ...")
    pgbench(env.rt, ["-i", "-s", str(a.scale), "-q"], direct, timeout=600)

    # 1. throughput
    sides = ["direct", "shortcut", "sockmap", "userspace"]
    for side in ("shortcut", "sockmap"):
        if not use_relay(p, side):
            log(f"the proxy cannot set up the {side} relay here: not measured")
            sides.remove(side)
    settle(p)
    pgbench(env.rt, ["-S", "-c", str(a.clients), "-j", "2", "-T", "3"], direct, timeout=120)  # warm-up, not counted
    tps: dict[str, list[float]] = {side: [] for side in sides}
    proxy_cpu: dict[str, list[float]] = {side: [] for side in sides if side != "direct"}  # us per transaction
    for r in range(a.rounds):
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:
            if side != "direct":
                assert use_relay(p, side)
                joined = relay_status(p)["joined"]
                pid = p.daemon("proxy").pid()
                cpu = cpu_seconds(pid)
            out = pgbench(env.rt, ["-S", "-c", str(a.clients), "-j", "2", "-T", str(a.seconds)],
                          proxied if side != "direct" else direct, timeout=a.seconds + 120)
            if side != "direct":  # every pgbench client (and its first connection, which reads the scale)
                n = relay_status(p)["joined"] - joined  # went the way it was meant to
                assert n == (0 if side == "userspace" else a.clients + 1), f"{n} sessions relayed in the kernel"
            tps[side].append(parse_pgbench(out)["tps"])
            extra = ""
            if side != "direct":
                proxy_cpu[side].append(round((cpu_seconds(pid) - cpu) * 1e6 / (tps[side][-1] * a.seconds), 1))
                extra = f", proxy CPU {proxy_cpu[side][-1]} us per transaction"
            log(f"round {r + 1}: {side} {tps[side][-1]:.0f} TPS{extra}")
    use_relay(p, sides[1])  # the rest runs through the proxy as it starts by default
    base = statistics.mean(tps["direct"])
    env.result["select_only"] = {"clients": a.clients, "seconds": a.seconds, "tps": tps,
                                 "proxy_cpu_us_per_tx": proxy_cpu,
                                 "ratio": {side: round(statistics.mean(tps[side]) / base, 3)
                                           for side in sides if side != "direct"}}

    # 2. connection set-up
    _connect_ms(proxied, 3)
    _connect_ms(direct, 3)
    conn_p, conn_d = _connect_ms(proxied, a.connects), _connect_ms(direct, a.connects)
    env.result["connect_ms"] = {"proxy": median(conn_p), "direct": median(conn_d),
                                "ratio": round(statistics.median(conn_p) / statistics.median(conn_d), 2)}
    log(f"connect: proxy {median(conn_p)} ms, direct {median(conn_d)} ms")

    # 3. cold start of a suspended branch
    log(f"loading {a.size_mb} MB for the cold-start branch ...")
    with psycopg.connect(direct, autocommit=True) as c:
        c.execute("CREATE TABLE cold (id int PRIMARY KEY, pad text)")
        rows = a.size_mb * 1024 * 1024 // 1100
        c.execute("INSERT INTO cold SELECT g, repeat(md5(g::text), 32) FROM generate_series(1, %s) g", (rows,))
        c.execute("CHECKPOINT")
        size = c.execute("SELECT pg_database_size('postgres')").fetchone()[0]
    create_branch(p, "cold", TimePoint("main"), suspend_timeout=1)
    uri = proxy_uri(p, "cold")
    colds = []
    for i in range(a.cold_reps + 1):  # the first wake builds the pool's data directory: not counted
        _wait(lambda i=i: not any(s.name == "cold" for s, _ in list_endpoints(p))
              and any(s["endpoint"] == "cold" for s in suspended_endpoints(p)) or i == 0, 60, "cold suspended")
        t = time.perf_counter()
        with psycopg.connect(uri, autocommit=True, connect_timeout=60) as c:
            c.execute("SELECT id FROM cold WHERE id = 42").fetchone()
        dt = time.perf_counter() - t
        log(f"cold start {i}: {dt:.3f} s" + (" (first: not counted)" if i == 0 else ""))
        if i:
            colds.append(dt)
    env.result["cold_start"] = {"database_mb": round(size / 2**20), "seconds": [round(x, 3) for x in colds],
                                "median_s": median(colds)}
    assert read_state(p, "main") is not None


def render(res: dict) -> list[str]:
    out = [""]
    s = res.get("select_only")
    if s:
        out.append(f"pgbench -S, {s['clients']} clients, {s['seconds']} s runs: direct "
                   f"{[round(x) for x in s['tps']['direct']]} TPS")
        for side, ratio in s["ratio"].items():
            out.append(f"  proxy, {side}: {[round(x) for x in s['tps'][side]]} TPS -> ratio {ratio}"
                       f" (target >= 0.8); proxy CPU {s['proxy_cpu_us_per_tx'][side]} us per transaction")
    c = res.get("connect_ms")
    if c:
        out.append(f"connect + SELECT 1 + close: proxy {c['proxy']} ms, direct {c['direct']} ms -> ratio {c['ratio']}"
                   " (target <= 2)")
    cs = res.get("cold_start")
    if cs:
        out.append(f"cold start of a suspended {cs['database_mb']} MB branch, connect to first row: "
                   f"{cs['seconds']} s, median {cs['median_s']} s (target <= 1 s)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--seconds", type=int, help="seconds per pgbench run (default 10; --quick 3)")
    ap.add_argument("--rounds", type=int, help="rounds (default 3; --quick 1)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--connects", type=int, default=50)
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--cold-reps", type=int, default=5)
    a = ap.parse_args(argv)
    a.seconds = a.seconds or (3 if a.quick else 10)
    a.rounds = a.rounds or (1 if a.quick else 3)
    return run_benchmark(a, "proxy", body, render)


if __name__ == "__main__":
    sys.exit(main())
