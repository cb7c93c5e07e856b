#!/usr/bin/env python3
"""Three safekeepers (quorum 2) against vanilla Postgres: pgbench TPS ratio and safekeeper WAL throughput.

    python benchmarks/bench_quorum.py [--pg-bin DIR] [--seconds N] [--rounds R] [--quick] [--json]

1. pgbench TPS (scale 10, -c 4 -j 2, TPC-B and -N, N seconds each) for
   - a neonctl endpoint on a project with `--safekeepers 3`: every commit waits until two of the three
     safekeepers fdatasync'ed it (`synchronous_standby_names = 'ANY 2 (sk1, sk2, sk3)'`), compute fsync=off;
   - vanilla Postgres from the same binaries, same settings, no standby, fsync=on (the target: >= 0.6);
   - with --single, also a neonctl endpoint with one safekeeper, for reference.
   Configurations are alternated (A B, then B A, ...), each segment from a freshly started server, a
   CHECKPOINT before every run. During each neonctl run the WAL every safekeeper flushed is measured.
2. Safekeeper WAL throughput, MB/s of WAL:
   - under pgbench (above);
   - bulk: one INSERT of --bulk-mb MB, from its start until its COMMIT returned (the quorum has it);
     the same statement on vanilla fsync=on for comparison;
   - catch-up: one safekeeper stopped during a bulk insert, then started: its peer recovery rate.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BenchEnv,
    bench_parser,
    endpoint_start,
    endpoint_stop,
    load_pgbench,
    log,
    parse_tps_args,
    render_tps,
    run_benchmark,
    sql,
    timeline_of,
    tps_result,
    tps_rounds,
    wait_pageserver,
    wait_sync_standby,
)

from neonctl.engine.project import Project
from neonctl.engine.safekeeper.admin import start_safekeeper, stop_safekeeper
from neonctl.engine.safekeeper.client import SafekeeperClient  # noqa: E402

MB = 1 << 20
TARGET = 0.6


def flush_lsns(p: Project, skip: tuple[int, ...] = ()) -> dict[int, int]:
    tl = timeline_of(p, "main")
    return {i: SafekeeperClient(i, a).timeline(tl)["flush_lsn"]
            for i, a in p.safekeeper_addrs().items() if i not in skip}


def wal_lsn(port: int) -> int:
    return int(sql(port, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")[0][0])


def bulk_insert(port: int, mb: int, table: str) -> tuple[float, int]:
    """One INSERT of about `mb` MB of rows; returns (seconds until COMMIT returned, WAL bytes)."""
    rows = mb * MB // 1100
    sql(port, f"DROP TABLE IF EXISTS {table}")
    sql(port, f"CREATE TABLE {table} (id int, pad text)")
    sql(port, "CHECKPOINT")
    lsn0 = wal_lsn(port)
    t = time.perf_counter()
    sql(port, f"INSERT INTO {table} SELECT g, repeat(md5(g::text), 32) FROM generate_series(1, {rows}) g")
    secs = time.perf_counter() - t
    return secs, wal_lsn(port) - lsn0


def body(env: BenchEnv) -> None:
    a = env.args
    q3 = env.project("bench-q3", safekeepers=3)
    projects = {"neonctl 3 sk (quorum 2)": q3}
    if a.single:
        projects["neonctl 1 sk"] = env.project("bench-q1")
    van = env.vanilla("tps")
    configs = [(label, "neon") for label in projects] + [("vanilla fsync=on", "vanilla")]
    probs_ep: list[str] = []

    def up(cfg: tuple) -> int:
        label, kind = cfg
        if kind == "neon":
            st = endpoint_start(projects[label], "main")
            wait_sync_standby(projects[label], st["port"])
            return st["port"]
        van.configure(q3, True)
        van.start()
        return van.port

    def down(cfg: tuple) -> None:
        label, kind = cfg
        if kind == "neon":
            endpoint_stop(projects[label], "main", probs_ep)
        else:
            van.stop()

    def settle(cfg: tuple) -> None:
        label, kind = cfg
        if kind == "neon":
            log(f"  pageserver caught up after {wait_pageserver(projects[label], 'main', layers=False):.1f}s")

    def around_run(cfg: tuple):
        """The WAL every safekeeper flushed during a neonctl run, per second of the run."""
        label, kind = cfg
        if kind != "neon":
            return lambda r: ""
        f0 = flush_lsns(projects[label])
        t0 = time.perf_counter()

        def after(r: dict) -> str:
            secs = time.perf_counter() - t0
            f1 = flush_lsns(projects[label])
            r["sk_wal_mb_s"] = {i: round((f1[i] - f0[i]) / MB / secs, 2) for i in f1}
            r["pageserver_lag_s"] = round(wait_pageserver(projects[label], "main", layers=False), 2)
            return f"  safekeeper WAL MB/s {r['sk_wal_mb_s']}"

        return after

    load_pgbench(env, configs, up, down, settle)
    runs, seen = tps_rounds(env, configs, up, down, around_run)
    ratios = [(label, "vanilla fsync=on") for label in projects]
    env.result["tps"] = tps_result(env, runs, seen, ratios, ("neonctl 3 sk (quorum 2) / vanilla fsync=on", TARGET))
    wal_rates = [v for rs in runs["neonctl 3 sk (quorum 2)"].values() for r in rs for v in r["sk_wal_mb_s"].values()]
    env.result["tps"]["sk_wal_mb_s_under_pgbench"] = {"mean": round(statistics.mean(wal_rates), 2),
                                                      "max": max(wal_rates)}
    if probs_ep:
        env.problems["endpoint postgres.log"] = probs_ep[:8]

    # -- bulk WAL throughput and catch-up
    port = up(configs[0])
    log(f"bulk insert of {a.bulk_mb} MB through the quorum ...")
    secs, wal = bulk_insert(port, a.bulk_mb, "bulk")
    quorum_rate = wal / MB / secs
    log(f"  {wal / MB:.0f} MB of WAL committed on the quorum in {secs:.1f}s: {quorum_rate:.1f} MB/s")
    log("stopping sk3, bulk insert, starting sk3: peer recovery ...")
    stop_safekeeper(q3, 3)
    secs2, wal2 = bulk_insert(port, a.bulk_mb, "bulk2")
    target = max(flush_lsns(q3, skip=(3,)).values())
    t = time.perf_counter()
    start_safekeeper(q3, 3)
    tl = timeline_of(q3, "main")
    addr = q3.safekeeper_addrs()[3]
    first = SafekeeperClient(3, addr).timeline(tl)["flush_lsn"]
    behind = target - first
    while SafekeeperClient(3, addr).timeline(tl)["flush_lsn"] < target:
        if time.perf_counter() - t > 300:
            raise RuntimeError("sk3 did not catch up within 300s")
        time.sleep(0.02)
    catchup_s = time.perf_counter() - t
    log(f"  sk3 caught up {behind / MB:.0f} MB in {catchup_s:.1f}s (including its start): "
        f"{behind / MB / catchup_s:.1f} MB/s")
    down(configs[0])
    van.configure(q3, True)
    van.start()
    vsecs, vwal = bulk_insert(van.port, a.bulk_mb, "bulk")
    van.stop()
    log(f"  vanilla fsync=on: the same insert in {vsecs:.1f}s ({vwal / MB / vsecs:.1f} MB/s of WAL)")
    env.result["wal"] = {
        "bulk_mb": a.bulk_mb,
        "quorum_bulk": {"wal_mb": round(wal / MB, 1), "seconds": round(secs, 2), "mb_s": round(quorum_rate, 1)},
        "quorum_bulk_one_down": {
            "wal_mb": round(wal2 / MB, 1),
            "seconds": round(secs2, 2),
            "mb_s": round(wal2 / MB / secs2, 1),
        },
        "vanilla_bulk": {
            "wal_mb": round(vwal / MB, 1),
            "seconds": round(vsecs, 2),
            "mb_s": round(vwal / MB / vsecs, 1),
        },
        "catch_up": {
            "behind_mb": round(behind / MB, 1),
            "seconds": round(catchup_s, 2),
            "mb_s": round(behind / MB / catchup_s, 1),
        },
    }


def table(res: dict) -> list[str]:
    out = []
    if "tps" in res:
        t = res["tps"]
        out.extend(render_tps(t))
        w = t["sk_wal_mb_s_under_pgbench"]
        out.append(f"safekeeper WAL under pgbench (3 sk): mean {w['mean']} MB/s per safekeeper, max {w['max']}")
    if "wal" in res:
        w = res["wal"]
        out.append("")
        out.append(f"safekeeper WAL throughput (one INSERT of ~{w['bulk_mb']} MB of rows, until its COMMIT returned):")
        out.append(
            f"  3 safekeepers, quorum 2        {w['quorum_bulk']['mb_s']:>7.1f} MB/s  "
            f"({w['quorum_bulk']['wal_mb']} MB WAL in {w['quorum_bulk']['seconds']} s)"
        )
        out.append(f"  same, one safekeeper down      {w['quorum_bulk_one_down']['mb_s']:>7.1f} MB/s")
        out.append(f"  vanilla fsync=on (no standby)  {w['vanilla_bulk']['mb_s']:>7.1f} MB/s")
        out.append(
            f"  peer recovery (catch-up)       {w['catch_up']['mb_s']:>7.1f} MB/s  "
            f"({w['catch_up']['behind_mb']} MB in {w['catch_up']['seconds']} s, including the daemon start)"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--bulk-mb", type=int, help="size of the bulk insert (default 64; --quick 8)")
    ap.add_argument("--single", action="store_true", help="also measure a one-safekeeper project")
    a = parse_tps_args(ap, argv)
    a.bulk_mb = a.bulk_mb or (8 if a.quick else 64)
    return run_benchmark(a, "bench-quorum", body, table)


if __name__ == "__main__":
    sys.exit(main())
