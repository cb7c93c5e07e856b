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

Everything lives in a fresh temporary NEONCTL_HOME that is removed at the end, also on failure or Ctrl-C.
Progress goes to stderr, results to stdout (a table, or JSON with --json; the table then goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_skeleton as sk  # noqa: E402 - the shared helpers: pgbench, vanilla servers, endpoints, cleanup
from neonctl.engine import client  # noqa: E402
from neonctl.engine.compute.runtime import resolve_runtime  # noqa: E402
from neonctl.engine.project import Project, create_project  # noqa: E402
from neonctl.engine.safekeeper.admin import start_safekeeper, stop_safekeeper  # noqa: E402
from neonctl.engine.storage import start_storage  # noqa: E402

log = sk.log
MB = 1 << 20
TARGET = 0.6


def new_project(name: str, pg_bin: str | None, safekeepers: int, attempts: int = 3) -> Project:
    """Create and start a project (again on other ports if a daemon lost its port to someone else)."""
    for attempt in range(attempts):
        log(f"neonctl: creating project {name} with {safekeepers} safekeeper(s) ...")
        p = create_project(name, pg_bin=pg_bin, safekeepers=safekeepers, progress=lambda m: log(f"  {m}"))
        try:
            start_storage(p, progress=lambda m: log(f"  {m}"))
            time.sleep(1.0)
            dead = [d.name for d in p.daemons() if d.pid() is None]
        except Exception:
            sk.teardown_project(p, None)
            raise
        if not dead:
            return p
        sk.teardown_project(p, None)
        if attempt == attempts - 1:
            raise RuntimeError(f"daemons of project {name} died right after start: {dead}")
        log(f"  {', '.join(dead)} died right after start; re-creating the project on other ports")
    raise AssertionError("unreachable")


def sk_flush(p: Project, skip: tuple[int, ...] = ()) -> dict[int, int]:
    tl = p.branch("main").timeline_id
    return {i: client.call(f"sk{i}", a, "GET", f"/v1/timeline/{tl}")["flush_lsn"]
            for i, a in p.safekeeper_addrs().items() if i not in skip}


def wal_lsn(port: int) -> int:
    return int(sk.sql(port, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")[0][0])


def bulk_insert(port: int, mb: int, table: str) -> tuple[float, int]:
    """One INSERT of about `mb` MB of rows; returns (seconds until COMMIT returned, WAL bytes)."""
    rows = mb * MB // 1100
    sk.sql(port, f"DROP TABLE IF EXISTS {table}")
    sk.sql(port, f"CREATE TABLE {table} (id int, pad text)")
    sk.sql(port, "CHECKPOINT")
    lsn0 = wal_lsn(port)
    t = time.perf_counter()
    sk.sql(port, f"INSERT INTO {table} SELECT g, repeat(md5(g::text), 32) FROM generate_series(1, {rows}) g")
    secs = time.perf_counter() - t
    return secs, wal_lsn(port) - lsn0


class Bench:
    def __init__(self, args):
        self.args = args
        self.rt = resolve_runtime(args.pg_bin)
        self.projects: list[Project] = []
        self.vanillas: list[sk.Vanilla] = []
        self.problems: dict[str, list[str]] = {}
        self.result: dict = {"pg_version": self.rt.version_string, "pg_bin": str(self.rt.bin_dir),
                             "cpus": os.cpu_count(), "load_start": sk.loadavg(), "quick": args.quick}

    def project(self, name: str, n: int) -> Project:
        p = new_project(name, self.args.pg_bin, n)
        self.projects.append(p)
        return p

    def vanilla(self, name: str) -> sk.Vanilla:
        v = sk.Vanilla(self.rt, Path(os.environ["NEONCTL_HOME"]) / "vanilla", name)
        self.vanillas.append(v)
        log(f"vanilla: initdb {v.pgdata} ...")
        v.init()
        return v

    def run(self) -> None:
        a = self.args
        q3 = self.project("bench-q3", 3)
        projects = {"neonctl 3 sk (quorum 2)": q3}
        if a.single:
            projects["neonctl 1 sk"] = self.project("bench-q1", 1)
        van = self.vanilla("tps")
        configs = [(label, "neon") for label in projects] + [("vanilla fsync=on", "vanilla")]
        modes = [("TPC-B", []), ("-N", ["-N"])]
        probs_ep: list[str] = []

        def up(label: str, kind: str) -> int:
            if kind == "neon":
                st = sk.endpoint_start(projects[label], False)
                sk.wait_sync_standby(projects[label], st["port"])
                return st["port"]
            van.configure(q3, True)
            van.start()
            return van.port

        def down(label: str, kind: str) -> None:
            if kind == "neon":
                sk.endpoint_stop(projects[label], probs_ep)
            else:
                van.stop()

        for label, kind in configs:
            port = up(label, kind)
            log(f"{label}: pgbench -i -s {a.scale} ...")
            sk.pgbench(self.rt, port, ["-i", "-s", str(a.scale), "-q"], timeout=1800)
            down(label, kind)
            if kind == "neon":
                log(f"  pageserver caught up after {sk.wait_pageserver(projects[label]):.1f}s")

        runs: dict[str, dict[str, list[dict]]] = {c[0]: {m[0]: [] for m in modes} for c in configs}
        settings_seen: dict[str, dict] = {}
        for rnd in range(a.rounds):
            order = configs if rnd % 2 == 0 else configs[::-1]
            for ci, (label, kind) in enumerate(order):
                port = up(label, kind)
                settings_seen.setdefault(label, sk.settings(port))
                mode_order = modes if (rnd + ci) % 2 == 0 else modes[::-1]
                for mname, margs in mode_order:
                    sk.sql(port, "CHECKPOINT")
                    la = os.getloadavg()[0]
                    f0 = sk_flush(projects[label]) if kind == "neon" else {}
                    t0 = time.perf_counter()
                    log(f"round {rnd + 1}/{a.rounds} {label:<24} {mname:<6} {a.seconds}s ...")
                    out = sk.pgbench(self.rt, port, ["-c", str(a.clients), "-j", str(a.jobs), "-T", str(a.seconds),
                                                     *margs], timeout=a.seconds + 300)
                    secs = time.perf_counter() - t0
                    r = sk.parse_pgbench(out)
                    r.update(round=rnd + 1, load1_before=round(la, 2), load1_after=round(os.getloadavg()[0], 2))
                    if kind == "neon":
                        f1 = sk_flush(projects[label])
                        r["sk_wal_mb_s"] = {i: round((f1[i] - f0[i]) / MB / secs, 2) for i in f1}
                        r["pageserver_lag_s"] = round(sk.wait_pageserver(projects[label]), 2)
                    runs[label][mname].append(r)
                    log(f"  tps {r['tps']:.0f}  latency {r['latency_ms']} ms  failed {r['failed']}"
                        + (f"  safekeeper WAL MB/s {r['sk_wal_mb_s']}" if kind == "neon" else ""))
                down(label, kind)
        summary = {label: {m: round(statistics.mean(r["tps"] for r in rs), 1) for m, rs in ms.items()}
                   for label, ms in runs.items()}
        ratios = {f"{label} / vanilla fsync=on": {m: round(summary[label][m] / summary["vanilla fsync=on"][m], 3)
                                                  for m, _ in modes} for label in projects}
        main_ratio = ratios["neonctl 3 sk (quorum 2) / vanilla fsync=on"]
        wal_rates = [v for rs in runs["neonctl 3 sk (quorum 2)"].values() for r in rs for v in r["sk_wal_mb_s"].values()]
        self.result["tps"] = {
            "scale": a.scale, "clients": a.clients, "jobs": a.jobs, "seconds": a.seconds, "rounds": a.rounds,
            "mean_tps": summary, "ratios": ratios, "runs": runs, "settings": settings_seen,
            "target": {"ratio": TARGET, "met": {m: v >= TARGET for m, v in main_ratio.items()}},
            "sk_wal_mb_s_under_pgbench": {"mean": round(statistics.mean(wal_rates), 2), "max": max(wal_rates)},
        }
        if probs_ep:
            self.problems["endpoint postgres.log"] = probs_ep[:8]

        # -- bulk WAL throughput and catch-up
        port = up("neonctl 3 sk (quorum 2)", "neon")
        log(f"bulk insert of {a.bulk_mb} MB through the quorum ...")
        secs, wal = bulk_insert(port, a.bulk_mb, "bulk")
        quorum_rate = wal / MB / secs
        log(f"  {wal / MB:.0f} MB of WAL committed on the quorum in {secs:.1f}s: {quorum_rate:.1f} MB/s")
        log("stopping sk3, bulk insert, starting sk3: peer recovery ...")
        stop_safekeeper(q3, 3)
        secs2, wal2 = bulk_insert(port, a.bulk_mb, "bulk2")
        target = max(sk_flush(q3, skip=(3,)).values())
        t = time.perf_counter()
        start_safekeeper(q3, 3)
        tl = q3.branch("main").timeline_id
        addr = q3.safekeeper_addrs()[3]
        first = client.call("sk3", addr, "GET", f"/v1/timeline/{tl}")["flush_lsn"]
        behind = target - first
        while client.call("sk3", addr, "GET", f"/v1/timeline/{tl}")["flush_lsn"] < target:
            if time.perf_counter() - t > 300:
                raise RuntimeError("sk3 did not catch up within 300s")
            time.sleep(0.02)
        catchup_s = time.perf_counter() - t
        log(f"  sk3 caught up {behind / MB:.0f} MB in {catchup_s:.1f}s (including its start): "
            f"{behind / MB / catchup_s:.1f} MB/s")
        down("neonctl 3 sk (quorum 2)", "neon")
        van.configure(q3, True)
        van.start()
        vsecs, vwal = bulk_insert(van.port, a.bulk_mb, "bulk")
        van.stop()
        log(f"  vanilla fsync=on: the same insert in {vsecs:.1f}s ({vwal / MB / vsecs:.1f} MB/s of WAL)")
        self.result["wal"] = {
            "bulk_mb": a.bulk_mb,
            "quorum_bulk": {"wal_mb": round(wal / MB, 1), "seconds": round(secs, 2), "mb_s": round(quorum_rate, 1)},
            "quorum_bulk_one_down": {"wal_mb": round(wal2 / MB, 1), "seconds": round(secs2, 2),
                                     "mb_s": round(wal2 / MB / secs2, 1)},
            "vanilla_bulk": {"wal_mb": round(vwal / MB, 1), "seconds": round(vsecs, 2), "mb_s": round(vwal / MB / vsecs, 1)},
            "catch_up": {"behind_mb": round(behind / MB, 1), "seconds": round(catchup_s, 2),
                         "mb_s": round(behind / MB / catchup_s, 1)},
        }
        van.problems = sk.log_problems(van.logfile)
        if van.problems:
            self.problems["vanilla postgres.log"] = van.problems

    def collect_logs(self) -> None:
        for p in self.projects:
            for f, probs in sk.daemon_log_problems(p).items():
                self.problems[f"{p.name}/{f}"] = probs

    def cleanup(self) -> None:
        for v in self.vanillas:
            try:
                v.kill()
            except Exception as e:  # noqa: BLE001
                log(f"cannot stop vanilla server {v.pgdata}: {e}")
        for p in self.projects:
            try:
                sk.teardown_project(p, self.args.keep_logs)
            except Exception as e:  # noqa: BLE001
                log(f"cannot delete project {p.name}: {e}")


def table(res: dict) -> str:
    out = [f"PostgreSQL {res['pg_version']} ({res['pg_bin']}), {res['cpus']} CPUs, "
           f"load average at start {res['load_start']}, at end {res.get('load_end')}"
           + ("  [--quick: NOT representative]" if res["quick"] else "")]
    if "tps" in res:
        t = res["tps"]
        out.append("")
        out.append(f"pgbench TPS: scale {t['scale']}, -c {t['clients']} -j {t['jobs']}, {t['seconds']} s per run, "
                   f"{t['rounds']} round(s) alternated; mean (runs)")
        out.append(f"{'configuration':<26}{'TPC-B':>9}  {'':<16}{'-N':>9}  {'':<16}{'load1':>11}")
        for label, ms in t["runs"].items():
            cells = []
            for m in ("TPC-B", "-N"):
                each = "(" + " ".join(f"{r['tps']:.0f}" for r in ms[m]) + ")"
                cells.append(f"{t['mean_tps'][label][m]:>9.0f}  {each:<16}")
            loads = [r["load1_before"] for m in ms.values() for r in m]
            out.append(f"{label:<26}{''.join(cells)}{min(loads):>5.1f}-{max(loads):<5.1f}")
        out.append("")
        out.append(f"{'ratio':<46}{'TPC-B':>7}{'-N':>7}")
        for k, v in t["ratios"].items():
            mark = ""
            if k.startswith("neonctl 3 sk"):
                mark = f"   target >= {TARGET}: " + ", ".join(f"{m} {'met' if ok else 'MISSED'}"
                                                           for m, ok in t["target"]["met"].items())
            out.append(f"{k:<46}{v['TPC-B']:>7.2f}{v['-N']:>7.2f}{mark}")
        w = t["sk_wal_mb_s_under_pgbench"]
        out.append(f"safekeeper WAL under pgbench (3 sk): mean {w['mean']} MB/s per safekeeper, max {w['max']}")
        diffs = {n: {lb: s.get(n) for lb, s in t["settings"].items()} for n in sk.SETTINGS}
        diffs = {n: v for n, v in diffs.items() if len(set(v.values())) > 1}
        out.append("settings that differ between configurations:" + ("" if diffs else " none"))
        out.extend(f"  {n}: " + ", ".join(f"{lb} {v!r}" for lb, v in vs.items()) for n, vs in diffs.items())
    if "wal" in res:
        w = res["wal"]
        out.append("")
        out.append(f"safekeeper WAL throughput (one INSERT of ~{w['bulk_mb']} MB of rows, until its COMMIT returned):")
        out.append(f"  3 safekeepers, quorum 2        {w['quorum_bulk']['mb_s']:>7.1f} MB/s  "
                   f"({w['quorum_bulk']['wal_mb']} MB WAL in {w['quorum_bulk']['seconds']} s)")
        out.append(f"  same, one safekeeper down      {w['quorum_bulk_one_down']['mb_s']:>7.1f} MB/s")
        out.append(f"  vanilla fsync=on (no standby)  {w['vanilla_bulk']['mb_s']:>7.1f} MB/s")
        out.append(f"  peer recovery (catch-up)       {w['catch_up']['mb_s']:>7.1f} MB/s  "
                   f"({w['catch_up']['behind_mb']} MB in {w['catch_up']['seconds']} s, including the daemon start)")
    if res.get("log_problems"):
        out.append("")
        out.append("log lines with ERROR/WARNING/FATAL/PANIC/Traceback:")
        for f, lines in res["log_problems"].items():
            out.append(f"  {f}:")
            out.extend(f"    {ln}" for ln in lines)
    if res.get("error"):
        out.append("")
        out.append(f"FAILED: {res['error']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pg-bin", help="PostgreSQL bin directory (default: the embedded PG 18)")
    ap.add_argument("--seconds", type=int, help="seconds per pgbench run (default 15; --quick 3)")
    ap.add_argument("--rounds", type=int, help="rounds over the configurations (default 2; --quick 1)")
    ap.add_argument("--scale", type=int, help="pgbench scale (default 10; --quick 2)")
    ap.add_argument("--bulk-mb", type=int, help="size of the bulk insert (default 64; --quick 8)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--single", action="store_true", help="also measure a one-safekeeper project")
    ap.add_argument("--quick", action="store_true", help="a fast smoke run; numbers are not representative")
    ap.add_argument("--json", action="store_true", help="print JSON on stdout (the table goes to stderr)")
    ap.add_argument("--keep-logs", type=Path, help="copy the daemon logs into this directory before cleanup")
    a = ap.parse_args(argv)
    q = a.quick
    a.seconds = a.seconds or (3 if q else 15)
    a.rounds = a.rounds or (1 if q else 2)
    a.scale = a.scale or (2 if q else 10)
    a.bulk_mb = a.bulk_mb or (8 if q else 64)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    home = Path(tempfile.mkdtemp(prefix="neonctl-bench-quorum-"))
    os.chmod(home, 0o755)
    os.environ["NEONCTL_HOME"] = str(home)
    bench = None
    rc = 0
    try:
        bench = Bench(a)
        log(f"PostgreSQL {bench.rt.version_string} from {bench.rt.bin_dir}; NEONCTL_HOME={home}")
        bench.run()
    except BaseException as e:  # noqa: BLE001 - report, clean up, exit non-zero
        rc = 130 if isinstance(e, KeyboardInterrupt) else 1
        log(f"benchmark failed: {type(e).__name__}: {e}")
        traceback.print_exc(file=sys.stderr)
        if bench is not None:
            bench.result["error"] = f"{type(e).__name__}: {e}"
    finally:
        if bench is not None:
            try:
                bench.collect_logs()
            except Exception as e:  # noqa: BLE001
                log(f"cannot scan logs: {e}")
            log("cleaning up ...")
            bench.cleanup()
        if home.exists():
            strays = sk.kill_strays(home)
            if strays:
                log(f"killed stray processes {strays}")
        shutil.rmtree(home, ignore_errors=True)
        log("cleaned up")
    if bench is None:
        return rc or 1
    res = bench.result
    res["load_end"] = sk.loadavg()
    res["log_problems"] = bench.problems
    text = table(res)
    if a.json:
        print(text, file=sys.stderr)
        print(json.dumps(res, indent=1))
    else:
        print(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
