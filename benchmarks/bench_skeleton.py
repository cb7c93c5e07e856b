#!/usr/bin/env python3
"""neonctl against vanilla Postgres: pgbench throughput and compute start time, from one run.

    python benchmarks/bench_skeleton.py [--pg-bin DIR] [--seconds N] [--rounds R] [--quick] [--json]

1. pgbench TPS (scale 10, -c 4 -j 2, TPC-B and -N, N seconds each) for
   - a neonctl endpoint (safekeeper as synchronous standby in the commit path), --no-fsync and --fsync;
   - vanilla Postgres from the same binaries with the same settings and no standby, fsync on and off,
     on a plain initdb data directory run by the same unprivileged user.
   The four configurations are alternated (A B C D, then D C B A, ...), each segment starting from a freshly
   started server; the two modes alternate within a segment. A CHECKPOINT precedes every run.
2. Start time for a ~100 MB database: `endpoint start` (materialise + replay + start, via the engine API)
   against `pg_ctl start -w` on a cleanly shut down data directory of the same size; median of N.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BenchEnv,
    bench_parser,
    db_bytes,
    du_bytes,
    endpoint_start,
    endpoint_stop,
    load_pgbench,
    log,
    mb,
    parse_tps_args,
    pgbench,
    render_tps,
    run_benchmark,
    run_cli,
    tps_result,
    tps_rounds,
    wait_pageserver,
    wait_sync_standby,
)

from neonctl.engine.compute import dir_pool  # noqa: E402
from neonctl.engine.compute.endpoint import directory_pool  # noqa: E402
from neonctl.engine.ports import ephemeral_port  # noqa: E402
from neonctl.engine.project import Project


def secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


def tree_cpu_s(pid: int | None) -> float:
    """CPU seconds of a process, its reaped children and its live descendants (a pageserver's redo worker)."""
    if not pid:
        return 0.0
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stats[int(entry)] = f.read().rsplit(")", 1)[1].split()
            except OSError:
                pass
    if pid not in stats:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(int(x) for x in stats[pid][11:15]) / tick
    children: dict[int, list[int]] = {}
    for p, f in stats.items():
        children.setdefault(int(f[1]), []).append(p)
    todo = list(children.get(pid, []))
    while todo:
        c = todo.pop()
        total += (int(stats[c][11]) + int(stats[c][12])) / tick
        todo.extend(children.get(c, []))
    return total


def wait_quiet(p: Project, window: float = 6.0, timeout: float = 180, idle: float = 0.05) -> float:
    """Wait until the storage daemons (and their children) did no work for `window` s; return seconds waited.

    After a load or a run the pageserver may still freeze layers or create an image (its image loop looks every
    5 s); that work belongs to neither the next measurement nor, worse, a vanilla run.
    """
    pids = [d.pid() for d in p.daemons()]
    t = time.monotonic()
    prev = sum(tree_cpu_s(pid) for pid in pids)
    quiet_since = t
    while time.monotonic() - t < timeout:
        time.sleep(0.5)
        cur = sum(tree_cpu_s(pid) for pid in pids)
        now = time.monotonic()
        if cur - prev >= idle / 2:
            quiet_since = now
        elif now - quiet_since >= window:
            return quiet_since - t
        prev = cur
    log(f"  storage daemons still busy after {timeout:.0f}s; measuring anyway")
    return timeout


# -- 1. TPS


def tps(env: BenchEnv) -> None:
    p = env.project("bench-tps")
    van = env.vanilla("tps")
    probs_ep: list[str] = []
    neon_starts: list[float] = []
    configs = [("neonctl --no-fsync", "neon", False), ("neonctl --fsync", "neon", True),
               ("vanilla fsync=on", "vanilla", True), ("vanilla fsync=off", "vanilla", False)]

    def up(cfg: tuple) -> int:
        _, kind, fsync = cfg
        if kind == "neon":
            st = endpoint_start(p, "main", fsync)
            neon_starts.append(st["total_s"])
            wait_sync_standby(p, st["port"])
            return st["port"]
        van.configure(p, fsync)
        van.start()
        return van.port

    def down(cfg: tuple) -> None:
        if cfg[1] == "neon":
            endpoint_stop(p, "main", probs_ep)
        else:
            van.stop()

    def settle(cfg: tuple) -> None:
        if cfg[1] == "neon":
            log(f"  pageserver caught up after {wait_pageserver(p, 'main', layers=False):.1f}s, "
                f"idle after {wait_quiet(p):.1f}s")

    def around_run(cfg: tuple):
        """A neonctl run starts on idle storage; the storage daemons' CPU and their work left over are its cost."""
        if cfg[1] != "neon":
            return lambda r: ""
        wait_pageserver(p, "main", layers=False)
        wait_quiet(p)
        daemons = {d: p.daemon(d).pid() for d in ("sk1", "pageserver")}
        cpu0 = {d: tree_cpu_s(pid) for d, pid in daemons.items()}

        def after(r: dict) -> str:
            r.update({f"{d}_cpu_s": round(tree_cpu_s(pid) - cpu0[d], 1) for d, pid in daemons.items()})
            r["pageserver_lag_s"] = round(wait_pageserver(p, "main", layers=False), 2)
            r["pageserver_busy_after_s"] = round(wait_quiet(p), 1)
            return (f"  CPU sk1 {r['sk1_cpu_s']}s pageserver {r['pageserver_cpu_s']}s, pageserver lag "
                    f"{r['pageserver_lag_s']}s")

        return after

    load_pgbench(env, [configs[0], configs[2]], up, down, settle)  # the fsync variants share a database
    runs, seen = tps_rounds(env, configs, up, down, around_run)
    if probs_ep:
        env.problems["bench-tps endpoint postgres.log"] = probs_ep[:8]
    ratios = [(num, den) for num in ("neonctl --no-fsync", "neonctl --fsync")
              for den in ("vanilla fsync=on", "vanilla fsync=off")]
    env.result["tps"] = tps_result(env, runs, seen, ratios, ("neonctl --no-fsync / vanilla fsync=on", 0.8))
    env.result["tps"]["neonctl_endpoint_start_s"] = neon_starts


# -- 2. start time


def start_time(env: BenchEnv) -> None:
    a = env.args
    p = env.project("bench-start")
    st = endpoint_start(p, "main")
    port = st["port"]
    log(f"neonctl: pgbench -i -s {a.start_scale} ...")
    pgbench(env.rt, port, ["-i", "-s", str(a.start_scale), "-q"], timeout=1800)
    db_mb = mb(db_bytes(port))
    probs: list[str] = []
    endpoint_stop(p, "main", probs)
    log(f"  database {db_mb} MB; pageserver caught up after {wait_pageserver(p, 'main', layers=False):.1f}s, "
        f"idle after {wait_quiet(p):.1f}s")

    neon, warm = [], []
    for i in range(a.reps):
        # cold: the kept directory's record is removed, so the start materialises (image + WAL replay)
        dir_pool.forget_all(directory_pool(p))
        log(f"neonctl endpoint start {i + 1}/{a.reps} (materialised) ...")
        st = endpoint_start(p, "main")
        st["pgdata_mb"] = mb(du_bytes(Path(st["pgdata"]), apparent=True))
        st["pgdata_without_wal_mb"] = mb(du_bytes(Path(st["pgdata"]), apparent=True, exclude="pg_wal"))
        neon.append(st)
        log(f"  {st['total_s']:.2f}s  (materialise {secs(st.get('materialise_s'))}, pg_ctl+verify "
            f"{secs(st.get('pg_ctl_verify_attach_s'))}, redo {secs(st.get('redo_s'))}); data dir {st['pgdata_mb']} MB")
        endpoint_stop(p, "main", probs)
        wait_pageserver(p, "main", layers=False)
        wait_quiet(p)
        # warm: the second start after a clean stop takes the stopped directory as it is
        log(f"neonctl endpoint start {i + 1}/{a.reps} (second start, warm) ...")
        st = endpoint_start(p, "main")
        warm.append(st)
        log(f"  {st['total_s']:.2f}s")
        endpoint_stop(p, "main", probs)
        wait_pageserver(p, "main", layers=False)
        wait_quiet(p)

    # one run through the CLI, for the process start-up cost the engine API does not pay
    wait_quiet(p)
    _, cli_s, _ = run_cli(["endpoint", "start", "main", "-p", p.name, "-o", "json", "--port", str(ephemeral_port())],
                          timeout=300)
    cli_s = round(cli_s, 3)
    log(f"  `neonctl endpoint start` (CLI process) {cli_s:.2f}s")
    endpoint_stop(p, "main", probs)
    if probs:
        env.problems["bench-start endpoint postgres.log"] = probs[:8]

    van = env.vanilla("start")
    van.configure(p, True)
    van.start()
    pgbench(env.rt, van.port, ["-i", "-s", str(a.start_scale), "-q"], timeout=1800)
    vdb_mb = mb(db_bytes(van.port))
    van.stop()
    vmb = mb(du_bytes(van.pgdata, apparent=True))
    vmb_nowal = mb(du_bytes(van.pgdata, apparent=True, exclude="pg_wal"))
    vanilla = []
    for i in range(a.reps):
        s = van.start()
        vanilla.append(round(s, 3))
        log(f"vanilla pg_ctl start -w {i + 1}/{a.reps}: {s:.3f}s")
        van.stop()

    nmed = statistics.median(r["total_s"] for r in neon)
    wmed = statistics.median(r["total_s"] for r in warm)
    vmed = statistics.median(vanilla)
    env.result["start"] = {
        "scale": a.start_scale, "reps": a.reps,
        "neonctl": {"db_mb": db_mb, "median_s": round(nmed, 3), "runs": neon, "cli_one_run_s": cli_s},
        "vanilla": {"db_mb": vdb_mb, "pgdata_mb": vmb, "pgdata_without_wal_mb": vmb_nowal,
                    "median_s": round(vmed, 3), "runs_s": vanilla},
        "ratio": round(nmed / vmed, 1),
        "warm": {"median_s": round(wmed, 3), "runs_s": [r["total_s"] for r in warm], "ratio": round(wmed / vmed, 2)},
    }


def body(env: BenchEnv) -> None:
    if env.args.only in (None, "start"):
        start_time(env)
    if env.args.only in (None, "tps"):
        tps(env)


# -- output -------------------------------------------------------------------------------------------


def table(res: dict) -> list[str]:
    out = []
    if "tps" in res:
        t = res["tps"]
        out.extend(render_tps(t))
        lags = [r.get("pageserver_lag_s", 0) for ms in t["runs"].values() for rs in ms.values() for r in rs]
        busy = [r.get("pageserver_busy_after_s", 0) for ms in t["runs"].values() for rs in ms.values() for r in rs]
        out.append(f"after neonctl runs: pageserver ingest lag max {max(lags):.1f}s, storage daemons busy for "
                   f"max {max(busy):.1f}s more (waited for before the next run)")
        for label in ("neonctl --no-fsync", "neonctl --fsync"):
            rs = [r for m in t["runs"][label].values() for r in m]
            sk = sum(r.get("sk1_cpu_s", 0) for r in rs) / max(1, sum(r["transactions"] or 0 for r in rs)) * 1e6
            ps = sum(r.get("pageserver_cpu_s", 0) for r in rs) / max(1, sum(r["transactions"] or 0 for r in rs)) * 1e6
            out.append(f"{label}: storage daemon CPU per transaction (with child processes): "
                       f"safekeeper {sk:.0f} us, pageserver {ps:.0f} us")
        out.append(
            "neonctl endpoint starts during the TPS part: "
            + " ".join(f"{x:.1f}" for x in t["neonctl_endpoint_start_s"])
            + " s (materialise + replay; the WAL to replay grows during the run)"
        )
    if "start" in res:
        s = res["start"]
        n, v = s["neonctl"], s["vanilla"]
        out.append("")
        out.append(
            f"start time, pgbench -i -s {s['scale']} database (neonctl {n['db_mb']} MB, vanilla {v['db_mb']} MB), "
            f"median of {s['reps']}"
        )
        out.append(f"{'':<30}{'median':>8}  runs")
        out.append(
            f"{'neonctl endpoint start':<30}{n['median_s']:>7.2f}s  "
            + ", ".join(f"{r['total_s']:.2f} (redo {secs(r.get('redo_s'))})" for r in n["runs"])
        )
        out.append(
            f"{'vanilla pg_ctl start -w':<30}{v['median_s']:>7.2f}s  " + " ".join(f"{x:.2f}" for x in v["runs_s"])
        )
        out.append(f"{'ratio neonctl/vanilla':<30}{s['ratio']:>7.1f}x")
        if "warm" in s:
            w = s["warm"]
            out.append(f"{'neonctl second start (warm)':<30}{w['median_s']:>7.2f}s  "
                       + " ".join(f"{x:.2f}" for x in w["runs_s"]) + f"   ratio {w['ratio']:.2f}x vanilla")
        med = sorted(n["runs"], key=lambda r: r["total_s"])[len(n["runs"]) // 2]
        out.append(
            f"neonctl median run: materialise {secs(med.get('materialise_s'))}, pg_ctl start + verify + "
            f"attach {secs(med.get('pg_ctl_verify_attach_s'))} (redo {secs(med.get('redo_s'))}, end-of-recovery "
            f"checkpoint {secs(med.get('end_of_recovery_checkpoint_s'))}), elect "
            f"{secs(med.get('elect_s'))}; "
            f"data dir {med['pgdata_mb']} MB ({med['pgdata_without_wal_mb']} MB without pg_wal) "
            f"vs vanilla {v['pgdata_mb']} MB ({v['pgdata_without_wal_mb']} MB); "
            f"one `neonctl endpoint start` CLI process: {n['cli_one_run_s']:.2f}s"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--reps", type=int, help="starts timed per side (default 3; --quick 1)")
    ap.add_argument("--start-scale", type=int, help="pgbench scale for the start-time database (default 6; --quick 1)")
    ap.add_argument("--only", choices=["tps", "start"], help="run one part only")
    a = parse_tps_args(ap, argv)
    a.reps = a.reps or (1 if a.quick else 3)
    a.start_scale = a.start_scale or (1 if a.quick else 6)
    return run_benchmark(a, "bench-skeleton", body, table)


if __name__ == "__main__":
    sys.exit(main())
