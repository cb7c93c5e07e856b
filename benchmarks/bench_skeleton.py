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

Everything lives in a fresh temporary NEONCTL_HOME that is removed at the end, also on failure or Ctrl-C.
Progress goes to stderr, results to stdout (a table, or JSON with --json; the table then goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import psycopg
from neonctl.engine import client, ports
from neonctl.engine.compute.endpoint import (
    compute_config,
    postgres_pid,
    read_state,
    start_endpoint,
    stop_endpoint,
)
from neonctl.engine.compute.runtime import PgRuntime, resolve_runtime
from neonctl.engine.process import log_tail
from neonctl.engine.project import Project, create_project, delete_project
from neonctl.engine.storage import start_storage, stop_storage
from neonctl.errors import Conflict, DaemonError, PostgresError

T0 = time.monotonic()
_HOME = Path("/nonexistent")  # set by main(): a fresh NEONCTL_HOME, removed at the end
SETTINGS = ("server_version", "shared_buffers", "wal_level", "synchronous_commit", "synchronous_standby_names",
            "fsync", "full_page_writes", "wal_compression", "data_checksums", "max_wal_size",
            "checkpoint_timeout", "wal_buffers", "wal_sync_method", "max_wal_senders")
LOG_PROBLEM = re.compile(r"\b(ERROR|FATAL|PANIC|CRITICAL|Traceback)\b|WARNING")


def secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


def log(msg: str) -> None:
    la = os.getloadavg()[0]
    print(f"[{time.monotonic() - T0:7.1f}s load {la:4.2f}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- Postgres helpers -----------------------------------------------------------------------------


def sql(port: int, query: str, params=None) -> list[tuple]:
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True,
                         connect_timeout=10) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def settings(port: int) -> dict[str, str]:
    rows = sql(port, "SELECT name, setting, coalesce(unit, '') FROM pg_settings WHERE name = ANY(%s)",
               (list(SETTINGS),))
    return {n: f"{s}{' x ' + u if u and u not in ('s', 'ms', 'kB', 'MB') else u}" for n, s, u in rows}


def client_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def pgbench(rt: PgRuntime, port: int, args: list[str], timeout: float) -> str:
    argv = [rt.bin("pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", *args, "postgres"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=client_env(), timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench {' '.join(args)} failed (exit {proc.returncode}): "
                           f"{' | '.join((proc.stderr or proc.stdout).strip().splitlines()[-5:])}")
    return proc.stdout + proc.stderr


def parse_pgbench(out: str) -> dict:
    def grab(pattern: str, cast=float):
        m = re.search(pattern, out)
        return cast(m.group(1)) if m else None

    tps = grab(r"tps = ([\d.]+) \(without initial connection time\)")
    if tps is None:
        raise RuntimeError(f"cannot find TPS in pgbench output: {out[-500:]}")
    return {"tps": round(tps, 1), "latency_ms": grab(r"latency average = ([\d.]+) ms"),
            "transactions": grab(r"number of transactions actually processed: (\d+)", int),
            "failed": grab(r"number of failed transactions: (\d+)", int) or 0}


def run_cli(argv: list[str], timeout: float = 300) -> str:
    """Run a neonctl command; if we are interrupted, let it clean up after itself (SIGINT) first."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[2:])} failed (exit {proc.returncode}): {err.strip()[-500:]}")
    return out


def kill_strays(home: Path) -> list[int]:
    """SIGKILL any process of ours still running from under `home` (a postmaster whose starter died)."""
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"{home}/" in cmd:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except OSError:
                pass
    return killed


def free_port() -> int:
    """A free loopback port away from 55432+ (where concurrent neonctl users race), per process."""
    base = 57000 + (os.getpid() * 7) % 3000
    port, = ports.allocate(base, set())
    return port


def dir_mb(path: Path, exclude: str | None = None) -> float:
    total = 0
    for root, dirs, files in os.walk(path):
        if exclude and exclude in dirs:
            dirs.remove(exclude)
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return round(total / 2**20, 1)


def log_problems(path: Path, limit: int = 8) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln.strip()[:300] for ln in lines if LOG_PROBLEM.search(ln)][:limit]


class Vanilla:
    """A plain initdb data directory run by the same user with the compute's settings minus the standby."""

    def __init__(self, rt: PgRuntime, root: Path, name: str):
        self.rt = rt
        self.dir = root / name
        self.pgdata = self.dir / "pgdata"
        self.logfile = self.dir / "postgres.log"
        self.port: int | None = None
        self.base_conf = ""
        self.problems: list[str] = []

    def init(self) -> None:
        self.dir.mkdir(parents=True)
        os.chmod(self.dir, 0o755)
        self.pgdata.mkdir(mode=0o700)
        self.rt.chown(self.dir, recursive=True)
        # the same initdb invocation as `neonctl init` (project.create_project)
        self.rt.run([self.rt.bin("initdb"), "-D", str(self.pgdata), "-U", "postgres", "--auth=trust",
                     "-E", "UTF8", "--locale=C", "-N"])
        self.base_conf = (self.pgdata / "postgresql.conf").read_text()

    def configure(self, project: Project, fsync: bool) -> None:
        if self.port is None:
            self.port = free_port()
        conf = compute_config(project, self.port, self.dir, fsync)
        conf, n = re.subn(r"(?m)^synchronous_standby_names\s*=.*$",
                          "synchronous_standby_names = ''  # vanilla peer: no standby", conf)
        assert n == 1, "compute_config no longer sets synchronous_standby_names"
        (self.pgdata / "postgresql.conf").write_text(self.base_conf + conf)
        self.rt.chown(self.pgdata / "postgresql.conf")

    def start(self) -> float:
        t = time.perf_counter()
        self.rt.run([self.rt.bin("pg_ctl"), "start", "-w", "-t", "120", "-D", str(self.pgdata),
                     "-l", str(self.logfile)], timeout=180)
        return time.perf_counter() - t

    def stop(self, mode: str = "fast") -> None:
        if postgres_pid(self.pgdata):
            self.rt.run([self.rt.bin("pg_ctl"), "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.pgdata)],
                        timeout=90)

    def kill(self) -> None:
        pid = postgres_pid(self.pgdata)
        if pid:
            try:
                self.stop("immediate")
            except Exception:  # noqa: BLE001
                os.kill(pid, signal.SIGKILL)


# -- neonctl helpers --------------------------------------------------------------------------------


def new_project(name: str, pg_bin: str | None, attempts: int = 3) -> Project:
    """Create and start a project; re-create it if a daemon lost its port to someone else's daemon.

    Ports are only checked against projects in the same NEONCTL_HOME, and `neonctl start` counts any HTTP 200
    on the port as healthy, so a daemon that could not bind looks started and is gone a moment later.
    """
    for attempt in range(attempts):
        log(f"neonctl: creating project {name} ...")
        p = create_project(name, pg_bin=pg_bin, progress=lambda m: log(f"  {m}"))
        try:
            start_storage(p, progress=lambda m: log(f"  {m}"))
            time.sleep(1.0)
            dead = [d.name for d in p.daemons() if d.pid() is None]
            logs = "; ".join(f"{d}: {log_tail(p.daemon(d).log_file, 1)}" for d in dead)
        except DaemonError as e:
            if "cannot listen" not in str(e) or attempt == attempts - 1:
                teardown_project(p, None)
                raise
            dead, logs = ["?"], str(e)
        except BaseException:
            teardown_project(p, None)
            raise
        if not dead:
            return p
        teardown_project(p, None)
        if attempt == attempts - 1:
            raise RuntimeError(f"daemons of project {name} died right after start: {logs}")
        log(f"  {', '.join(dead)} died right after start ({logs}); re-creating the project on other ports")
    raise AssertionError("unreachable")


def timeline_id(p: Project) -> str:
    return p.branch("main").timeline_id


def wait_pageserver(p: Project, timeout: float = 300) -> float:
    """Wait until the pageserver holds all WAL the safekeepers have; return the seconds waited."""
    tl = timeline_id(p)
    flush = max(client.call(f"sk{i}", a, "GET", f"/v1/timeline/{tl}")["flush_lsn"]
                for i, a in p.safekeeper_addrs().items())
    t = time.monotonic()
    while True:
        info = client.call("pageserver", p.pageserver_addr, "GET", f"/v1/timeline/{tl}")
        if info["received_lsn"] >= flush and info["last_record_lsn"] > 0:
            return time.monotonic() - t
        if time.monotonic() - t > timeout:
            raise RuntimeError(f"pageserver did not catch up within {timeout:.0f}s "
                               f"(received {info['received_lsn']}, safekeepers flushed {flush})")
        time.sleep(0.1)


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


def wait_sync_standby(p: Project, port: int, timeout: float = 60) -> list[tuple]:
    """The safekeepers must be attached as synchronous standbys before anything is measured."""
    quorum = len(p.config.safekeepers) // 2 + 1
    deadline = time.monotonic() + timeout
    while True:
        rows = sql(port, "SELECT application_name, state, sync_state FROM pg_stat_replication")
        if sum(1 for _, state, sync in rows if state == "streaming" and sync in ("sync", "quorum")) >= quorum:
            return rows
        if time.monotonic() > deadline:
            raise RuntimeError(f"safekeepers not streaming as synchronous standbys after {timeout:.0f}s: {rows}")
        time.sleep(0.1)


def endpoint_start(p: Project, fsync: bool) -> dict:
    """Start the endpoint through the engine API; time it and split it into phases."""
    marks: dict[str, float] = {}

    def progress(msg: str) -> None:
        marks.setdefault("materialise" if msg.startswith("materialising") else
                         "pg_ctl" if msg.startswith("starting PostgreSQL") else msg, time.perf_counter())
        log(f"  {msg}")

    for attempt in range(3):
        port = free_port()
        marks.clear()
        t0 = time.perf_counter()
        try:
            st = start_endpoint(p, "main", port=port, fsync=fsync, progress=progress)
        except (Conflict, PostgresError) as e:  # lost a race for the port: measure again
            if attempt == 2 or "port" not in str(e).lower() + str(getattr(e, "hint", "")).lower():
                raise
            log(f"  port {port} taken meanwhile ({e}); again")
            continue
        t1 = time.perf_counter()
        break
    out = {"total_s": t1 - t0, "port": st.port, "pgdata": st.pgdata}
    if "materialise" in marks and "pg_ctl" in marks:
        out.update(before_materialise_s=marks["materialise"] - t0,
                   materialise_s=marks["pg_ctl"] - marks["materialise"],
                   pg_ctl_and_verify_s=t1 - marks["pg_ctl"])
    text = (Path(st.pgdata).parent / "postgres.log").read_text(errors="replace")
    m = re.search(r"redo done at .*?elapsed: ([\d.]+) s", text)
    if m:
        out["redo_s"] = float(m.group(1))
    m = re.search(r"checkpoint starting: end-of-recovery.*?checkpoint complete:.*?total=([\d.]+) s", text, re.DOTALL)
    if m:
        out["end_of_recovery_checkpoint_s"] = float(m.group(1))
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def endpoint_stop(p: Project, problems: list[str]) -> None:
    st = read_state(p, "main")
    if st is not None:
        problems.extend(log_problems(Path(st.pgdata).parent / "postgres.log"))
    stop_endpoint(p, "main")


def daemon_log_problems(p: Project) -> dict[str, list[str]]:
    out = {}
    for f in sorted(p.dir.rglob("*.log")):
        probs = log_problems(f)
        if probs:
            out[str(f.relative_to(p.dir))] = probs
    return out


def teardown_project(p: Project, keep_logs: Path | None) -> None:
    if keep_logs:
        for f in p.dir.rglob("*.log"):
            dest = keep_logs / p.name / f.relative_to(p.dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
    try:
        delete_project(p)
        return
    except Exception as e:  # noqa: BLE001 - fall back to brute force, leave nothing running
        log(f"delete_project({p.name}) failed: {e}; killing what is left")
    st = read_state(p, "main")
    if st is not None:
        pid = postgres_pid(st.pgdata)
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
    try:
        stop_storage(p, immediate=True)
    except Exception as e:  # noqa: BLE001
        log(f"stop_storage({p.name}) failed: {e}")
    shutil.rmtree(p.compute_root(), ignore_errors=True)
    shutil.rmtree(p.dir, ignore_errors=True)


# -- the benchmark ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, args):
        self.args = args
        self.rt = resolve_runtime(args.pg_bin)
        self.projects: list[Project] = []
        self.vanillas: list[Vanilla] = []
        self.problems: dict[str, list[str]] = {}
        self.result: dict = {
            "pg_version": self.rt.version_string, "pg_bin": str(self.rt.bin_dir), "cpus": os.cpu_count(),
            "load_start": loadavg(), "quick": args.quick,
        }

    def project(self, name: str) -> Project:
        p = new_project(name, self.args.pg_bin)
        self.projects.append(p)
        return p

    def vanilla(self, name: str) -> Vanilla:
        v = Vanilla(self.rt, _HOME / "vanilla", name)
        self.vanillas.append(v)
        log(f"vanilla: initdb {v.pgdata} ...")
        v.init()
        return v

    # ---- 1. TPS

    def tps(self) -> None:
        a = self.args
        p = self.project("bench-tps")
        van = self.vanilla("tps")
        probs_ep: list[str] = []
        configs = [("neonctl --no-fsync", "neon", False), ("neonctl --fsync", "neon", True),
                   ("vanilla fsync=on", "vanilla", True), ("vanilla fsync=off", "vanilla", False)]
        modes = [("TPC-B", []), ("-N", ["-N"])]

        def up(kind: str, fsync: bool) -> int:
            if kind == "neon":
                st = endpoint_start(p, fsync)
                neon_starts.append(st["total_s"])
                wait_sync_standby(p, st["port"])
                return st["port"]
            van.configure(p, fsync)
            van.start()
            return van.port

        def down(kind: str) -> None:
            if kind == "neon":
                endpoint_stop(p, probs_ep)
            else:
                van.stop()

        # load both databases
        settings_seen = {}
        neon_starts: list[float] = []
        for label, kind, fsync in (configs[0], configs[2]):
            port = up(kind, fsync)
            log(f"{label}: pgbench -i -s {a.scale} ...")
            t = time.perf_counter()
            pgbench(self.rt, port, ["-i", "-s", str(a.scale), "-q"], timeout=1800)
            size = sql(port, "SELECT pg_size_pretty(pg_database_size('postgres'))")[0][0]
            log(f"  loaded in {time.perf_counter() - t:.1f}s; database {size}")
            down(kind)
            if kind == "neon":
                log(f"  pageserver caught up after {wait_pageserver(p):.1f}s, idle after {wait_quiet(p):.1f}s")

        runs: dict[str, dict[str, list[dict]]] = {c[0]: {m[0]: [] for m in modes} for c in configs}
        for rnd in range(a.rounds):
            order = configs if rnd % 2 == 0 else configs[::-1]
            for ci, (label, kind, fsync) in enumerate(order):
                port = up(kind, fsync)
                settings_seen.setdefault(label, settings(port))
                mode_order = modes if (rnd + ci) % 2 == 0 else modes[::-1]
                for mname, margs in mode_order:
                    sql(port, "CHECKPOINT")
                    if kind == "neon":
                        wait_pageserver(p)
                        wait_quiet(p)
                    la = os.getloadavg()[0]
                    daemons = {d: p.daemon(d).pid() for d in ("sk1", "pageserver")} if kind == "neon" else {}
                    cpu0 = {d: tree_cpu_s(pid) for d, pid in daemons.items()}
                    log(f"round {rnd + 1}/{a.rounds} {label:<20} {mname:<6} {a.seconds}s ...")
                    out = pgbench(self.rt, port, ["-c", str(a.clients), "-j", str(a.jobs), "-T", str(a.seconds),
                                                  *margs], timeout=a.seconds + 300)
                    r = parse_pgbench(out)
                    r.update(round=rnd + 1, load1_before=round(la, 2), load1_after=round(os.getloadavg()[0], 2))
                    if kind == "neon":
                        r.update({f"{d}_cpu_s": round(tree_cpu_s(pid) - cpu0[d], 1) for d, pid in daemons.items()})
                        r["pageserver_lag_s"] = round(wait_pageserver(p), 2)
                        r["pageserver_busy_after_s"] = round(wait_quiet(p), 1)
                    runs[label][mname].append(r)
                    log(f"  tps {r['tps']:.0f}  latency {r['latency_ms']} ms  failed {r['failed']}"
                        + (f"  CPU sk1 {r['sk1_cpu_s']}s pageserver {r['pageserver_cpu_s']}s, pageserver lag "
                           f"{r['pageserver_lag_s']}s" if kind == "neon" else ""))
                down(kind)

        if probs_ep:
            self.problems["bench-tps endpoint postgres.log"] = probs_ep[:8]
        van.problems = log_problems(van.logfile)
        if van.problems:
            self.problems["vanilla tps postgres.log"] = van.problems
        summary = {label: {m: round(statistics.mean(r["tps"] for r in rs), 1) for m, rs in ms.items()}
                   for label, ms in runs.items()}
        ratios = {}
        for num in ("neonctl --no-fsync", "neonctl --fsync"):
            for den in ("vanilla fsync=on", "vanilla fsync=off"):
                ratios[f"{num} / {den}"] = {m: round(summary[num][m] / summary[den][m], 3) for m, _ in modes}
        target = ratios["neonctl --no-fsync / vanilla fsync=on"]
        self.result["tps"] = {
            "scale": a.scale, "clients": a.clients, "jobs": a.jobs, "seconds": a.seconds, "rounds": a.rounds,
            "mean_tps": summary, "ratios": ratios, "runs": runs, "settings": settings_seen,
            "neonctl_endpoint_start_s": neon_starts,
            "target": {"ratio": 0.8, "met": {m: v >= 0.8 for m, v in target.items()}},
        }

    # ---- 2. start time

    def start_time(self) -> None:
        a = self.args
        p = self.project("bench-start")
        st = endpoint_start(p, False)
        port = st["port"]
        log(f"neonctl: pgbench -i -s {a.start_scale} ...")
        pgbench(self.rt, port, ["-i", "-s", str(a.start_scale), "-q"], timeout=1800)
        db_mb = round(sql(port, "SELECT pg_database_size('postgres')")[0][0] / 2**20, 1)
        probs: list[str] = []
        endpoint_stop(p, probs)
        log(f"  database {db_mb} MB; pageserver caught up after {wait_pageserver(p):.1f}s, "
            f"idle after {wait_quiet(p):.1f}s")

        neon = []
        for i in range(a.reps):
            log(f"neonctl endpoint start {i + 1}/{a.reps} ...")
            st = endpoint_start(p, False)
            st["pgdata_mb"] = dir_mb(Path(st["pgdata"]))
            st["pgdata_without_wal_mb"] = dir_mb(Path(st["pgdata"]), exclude="pg_wal")
            neon.append(st)
            log(f"  {st['total_s']:.2f}s  (materialise {secs(st.get('materialise_s'))}, pg_ctl+verify "
                f"{secs(st.get('pg_ctl_and_verify_s'))}, redo {secs(st.get('redo_s'))}); data dir {st['pgdata_mb']} MB")
            endpoint_stop(p, probs)
            wait_pageserver(p)
            wait_quiet(p)

        # one run through the CLI, for the process start-up cost the engine API does not pay
        wait_quiet(p)
        cli = [sys.executable, "-m", "neonctl", "endpoint", "start", "main", "-p", p.name, "-o", "json",
               "--port", str(free_port())]
        t = time.perf_counter()
        run_cli(cli)
        cli_s = round(time.perf_counter() - t, 3)
        log(f"  `neonctl endpoint start` (CLI process) {cli_s:.2f}s")
        endpoint_stop(p, probs)
        if probs:
            self.problems["bench-start endpoint postgres.log"] = probs[:8]

        van = self.vanilla("start")
        van.configure(p, True)
        van.start()
        pgbench(self.rt, van.port, ["-i", "-s", str(a.start_scale), "-q"], timeout=1800)
        vdb_mb = round(sql(van.port, "SELECT pg_database_size('postgres')")[0][0] / 2**20, 1)
        van.stop()
        vmb = dir_mb(van.pgdata)
        vmb_nowal = dir_mb(van.pgdata, exclude="pg_wal")
        vanilla = []
        for i in range(a.reps):
            s = van.start()
            vanilla.append(round(s, 3))
            log(f"vanilla pg_ctl start -w {i + 1}/{a.reps}: {s:.3f}s")
            van.stop()
        if log_problems(van.logfile):
            self.problems["vanilla start postgres.log"] = log_problems(van.logfile)

        nmed = statistics.median(r["total_s"] for r in neon)
        vmed = statistics.median(vanilla)
        self.result["start"] = {
            "scale": a.start_scale, "reps": a.reps,
            "neonctl": {"db_mb": db_mb, "median_s": round(nmed, 3), "runs": neon, "cli_one_run_s": cli_s},
            "vanilla": {"db_mb": vdb_mb, "pgdata_mb": vmb, "pgdata_without_wal_mb": vmb_nowal,
                        "median_s": round(vmed, 3), "runs_s": vanilla},
            "ratio": round(nmed / vmed, 1),
        }

    def run(self) -> None:
        if self.args.only in (None, "start"):
            self.start_time()
        if self.args.only in (None, "tps"):
            self.tps()

    def collect_logs(self) -> None:
        for p in self.projects:
            for f, probs in daemon_log_problems(p).items():
                self.problems[f"{p.name}/{f}"] = probs

    def cleanup(self) -> None:
        for v in self.vanillas:
            try:
                v.kill()
            except Exception as e:  # noqa: BLE001
                log(f"cannot stop vanilla server {v.pgdata}: {e}")
        for p in self.projects:
            try:
                teardown_project(p, self.args.keep_logs)
            except Exception as e:  # noqa: BLE001
                log(f"cannot delete project {p.name}: {e}")


# -- output -------------------------------------------------------------------------------------------


def table(res: dict) -> str:
    out = [f"PostgreSQL {res['pg_version']} ({res['pg_bin']}), {res['cpus']} CPUs, "
           f"load average at start {res['load_start']}, at end {res.get('load_end')}"
           + ("  [--quick: NOT representative]" if res["quick"] else "")]
    if "tps" in res:
        t = res["tps"]
        out.append("")
        out.append(f"pgbench TPS: scale {t['scale']}, -c {t['clients']} -j {t['jobs']}, {t['seconds']} s per run, "
                   f"{t['rounds']} round(s) alternated; mean (runs)")
        out.append(f"{'configuration':<22}{'TPC-B':>9}  {'':<16}{'-N':>9}  {'':<16}{'load1':>11}")
        for label, ms in t["runs"].items():
            cells = []
            for m in ("TPC-B", "-N"):
                rs = ms[m]
                each = "(" + " ".join(f"{r['tps']:.0f}" for r in rs) + ")"
                cells.append(f"{t['mean_tps'][label][m]:>9.0f}  {each:<16}")
            loads = [r["load1_before"] for m in ms.values() for r in m]
            out.append(f"{label:<22}{''.join(cells)}{min(loads):>5.1f}-{max(loads):<5.1f}")
        out.append("")
        out.append(f"{'ratio':<42}{'TPC-B':>7}{'-N':>7}")
        for k, v in t["ratios"].items():
            mark = ""
            if k == "neonctl --no-fsync / vanilla fsync=on":
                mark = "   target >= 0.8: " + ", ".join(f"{m} {'met' if ok else 'MISSED'}"
                                                        for m, ok in t["target"]["met"].items())
            out.append(f"{k:<42}{v['TPC-B']:>7.2f}{v['-N']:>7.2f}{mark}")
        diffs = {}
        for name in SETTINGS:
            vals = {label: s.get(name) for label, s in t["settings"].items()}
            if len(set(vals.values())) > 1:
                diffs[name] = vals
        out.append("settings that differ between configurations:" + ("" if diffs else " none"))
        out.extend(f"  {n}: " + ", ".join(f"{lb} {v!r}" for lb, v in vs.items()) for n, vs in diffs.items())
        lags = [r.get("pageserver_lag_s", 0) for ms in t["runs"].values() for rs in ms.values() for r in rs]
        busy = [r.get("pageserver_busy_after_s", 0) for ms in t["runs"].values() for rs in ms.values() for r in rs]
        out.append(f"after neonctl runs: pageserver ingest lag max {max(lags):.1f}s, storage daemons busy for "
                   f"max {max(busy):.1f}s more (waited for before the next run)")
        for label in ("neonctl --no-fsync", "neonctl --fsync"):
            rs = [r for m in t["runs"][label].values() for r in m]
            sk = sum(r.get("sk1_cpu_s", 0) for r in rs) / max(1, sum(r["transactions"] or 0 for r in rs)) * 1e6
            ps = sum(r.get("pageserver_cpu_s", 0) for r in rs) / max(1, sum(r["transactions"] or 0 for r in rs)) * 1e6
            out.append(f"{label}: storage daemon CPU per transaction (with child processes): safekeeper {sk:.0f} us, pageserver {ps:.0f} us")
        out.append("neonctl endpoint starts during the TPS part: "
                   + " ".join(f"{x:.1f}" for x in t["neonctl_endpoint_start_s"]) + " s (materialise + replay; the WAL to replay grows during the run)")
    if "start" in res:
        s = res["start"]
        n, v = s["neonctl"], s["vanilla"]
        out.append("")
        out.append(f"start time, pgbench -i -s {s['scale']} database (neonctl {n['db_mb']} MB, vanilla {v['db_mb']} MB), "
                   f"median of {s['reps']}")
        out.append(f"{'':<30}{'median':>8}  runs")
        out.append(f"{'neonctl endpoint start':<30}{n['median_s']:>7.2f}s  "
                   + ", ".join(f"{r['total_s']:.2f} (redo {secs(r.get('redo_s'))})" for r in n["runs"]))
        out.append(f"{'vanilla pg_ctl start -w':<30}{v['median_s']:>7.2f}s  " + " ".join(f"{x:.2f}" for x in v["runs_s"]))
        out.append(f"{'ratio neonctl/vanilla':<30}{s['ratio']:>7.1f}x")
        med = sorted(n["runs"], key=lambda r: r["total_s"])[len(n["runs"]) // 2]
        out.append(f"neonctl median run: materialise {secs(med.get('materialise_s'))}, pg_ctl start + verify + "
                   f"attach {secs(med.get('pg_ctl_and_verify_s'))} (redo {secs(med.get('redo_s'))}, end-of-recovery "
                   f"checkpoint {secs(med.get('end_of_recovery_checkpoint_s'))}), other "
                   f"{secs(med.get('before_materialise_s'))}; "
                   f"data dir {med['pgdata_mb']} MB ({med['pgdata_without_wal_mb']} MB without pg_wal) "
                   f"vs vanilla {v['pgdata_mb']} MB ({v['pgdata_without_wal_mb']} MB); "
                   f"one `neonctl endpoint start` CLI process: {n['cli_one_run_s']:.2f}s")
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
    ap.add_argument("--rounds", type=int, help="rounds over the 4 configurations (default 2; --quick 1)")
    ap.add_argument("--reps", type=int, help="starts timed per side (default 3; --quick 1)")
    ap.add_argument("--scale", type=int, help="pgbench scale for TPS (default 10; --quick 2)")
    ap.add_argument("--start-scale", type=int, help="pgbench scale for the start-time database (default 6; --quick 1)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a fast smoke run; numbers are not representative")
    ap.add_argument("--only", choices=["tps", "start"], help="run one part only")
    ap.add_argument("--json", action="store_true", help="print JSON on stdout (the table goes to stderr)")
    ap.add_argument("--keep-logs", type=Path, help="copy the daemon logs into this directory before cleanup")
    a = ap.parse_args(argv)
    q = a.quick
    a.seconds = a.seconds or (3 if q else 15)
    a.rounds = a.rounds or (1 if q else 2)
    a.reps = a.reps or (1 if q else 3)
    a.scale = a.scale or (2 if q else 10)
    a.start_scale = a.start_scale or (1 if q else 6)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    global _HOME
    # a fresh home: the benchmark never touches the user's projects (neonctl reads it at every call)
    _HOME = Path(tempfile.mkdtemp(prefix="neonctl-bench-"))
    os.chmod(_HOME, 0o755)  # compute data dirs then live under it (reachable by the Postgres user)
    os.environ["NEONCTL_HOME"] = str(_HOME)
    bench = None
    rc = 0
    try:
        bench = Bench(a)
        log(f"PostgreSQL {bench.rt.version_string} from {bench.rt.bin_dir}; NEONCTL_HOME={_HOME}")
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
        if _HOME.exists():
            strays = kill_strays(_HOME)
            if strays:
                log(f"killed stray processes {strays}")
                if bench is not None:
                    bench.problems["cleanup"] = [f"killed stray processes still running from {_HOME}: {strays}"]
        shutil.rmtree(_HOME, ignore_errors=True)
        log("cleaned up")
    if bench is None:
        return rc or 1
    res = bench.result
    res["load_end"] = loadavg()
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
