"""Shared helpers of the benchmarks that race neonctl against vanilla Postgres (bench_skeleton.py,
bench_quorum.py, bench_images.py, bench_branching.py); not a benchmark itself.

A benchmark runs inside a `BenchEnv`: a fresh NEONCTL_HOME (mode 0700, so compute data directories go
under /var/lib/neonctl/compute/<hash>) and a fresh directory under /var/lib/neonctl/bench-*/ for the
vanilla peers, both removed at the end together with every project, Postgres server and stray process
started from them, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import psycopg

from neonctl.engine import ports
from neonctl.engine.compute import dir_pool
from neonctl.engine.compute.endpoint import (
    compute_config,
    directory_pool,
    list_endpoints,
    postgres_pid,
    read_state,
    start_endpoint,
    stop_endpoint,
)
from neonctl.engine.compute.runtime import PgRuntime, resolve_runtime, shared_dir
from neonctl.engine.lifecycle import create_project, delete_project
from neonctl.engine.lsn import parse_lsn
from neonctl.engine.pageserver.client import PageserverClient  # noqa: E402
from neonctl.engine.pageserver.config import PageserverConfig
from neonctl.engine.process import log_tail
from neonctl.engine.project import Project
from neonctl.engine.roles import get_role
from neonctl.engine.safekeeper.client import SafekeeperClient  # noqa: E402
from neonctl.engine.storage import start_storage, stop_storage
from neonctl.errors import Conflict, DaemonError, PostgresError

T0 = time.monotonic()
LOG_PROBLEM = re.compile(r"\b(ERROR|FATAL|PANIC|CRITICAL|Traceback)\b|WARNING")
OUR_POLLING = re.compile(r"FATAL:  the database system is (not accepting connections|starting up)")  # our own polls
SETTINGS = ("server_version", "shared_buffers", "wal_level", "synchronous_commit", "synchronous_standby_names",
            "fsync", "full_page_writes", "wal_compression", "data_checksums", "max_wal_size",
            "checkpoint_timeout", "wal_buffers", "wal_sync_method", "max_wal_senders")


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s load {os.getloadavg()[0]:4.2f}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def mb(n: float | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


# -- Postgres clients ------------------------------------------------------------------------------


# port -> the `postgres` role's password of the neonctl compute listening there (computes want SCRAM over
# TCP); vanilla peers use trust and ignore it
PASSWORDS: dict[int, str] = {}


def _password(port: int) -> str | None:
    """The password for a neonctl compute on `port` (any project of the bench home), None for a vanilla peer."""
    if port not in PASSWORDS:
        from neonctl.engine.project import list_projects  # noqa: PLC0415

        for proj in list_projects():
            for st, _ in list_endpoints(proj):
                PASSWORDS[st.port] = get_role(proj, "postgres").password
    return PASSWORDS.get(port)


def sql(port: int, query: str, params=None, db: str = "postgres") -> list[tuple]:
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname={db}", autocommit=True,
                         connect_timeout=10, password=_password(port)) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def timed_sql(port: int, query: str, db: str = "postgres") -> float:
    """Seconds one statement takes on an already open connection (connection set-up not counted)."""
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname={db}", autocommit=True,
                         connect_timeout=10, password=_password(port)) as conn:
        t = time.perf_counter()
        conn.execute(query)
        return time.perf_counter() - t


def client_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def pgbench(rt: PgRuntime, port: int, args: list[str], timeout: float, db: str = "postgres") -> str:
    argv = [rt.bin("pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", *args, db]
    env = client_env()
    if _password(port):
        env["PGPASSWORD"] = _password(port)
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
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


def settings(port: int) -> dict[str, str]:
    """The server settings (SETTINGS) that could make two configurations' TPS differ, with their units."""
    rows = sql(port, "SELECT name, setting, coalesce(unit, '') FROM pg_settings WHERE name = ANY(%s)",
               (list(SETTINGS),))
    return {n: f"{s}{' x ' + u if u and u not in ('s', 'ms', 'kB', 'MB') else u}" for n, s, u in rows}


def db_bytes(port: int, db: str = "postgres") -> int:
    return int(sql(port, "SELECT pg_database_size(%s)", (db,))[0][0])


def run_cli(args: list[str], timeout: float = 900) -> tuple[str, float, list[tuple[float, str]]]:
    """Run `python -m neonctl ARGS`; return (stdout, seconds, [(seconds since start, progress line on stderr)]).
    On interruption let it clean up after itself (SIGINT) first."""
    argv = [sys.executable, "-m", "neonctl", *args]
    marks: list[tuple[float, str]] = []
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def read_err() -> None:  # the CLI's progress lines, timestamped as they arrive (stderr is line-buffered)
        for line in proc.stderr:
            marks.append((round(time.perf_counter() - t, 3), line.rstrip()))

    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    try:
        out = proc.stdout.read()
        proc.wait(timeout=timeout)
    except BaseException:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    dt = time.perf_counter() - t
    reader.join(5)
    if proc.returncode != 0:
        err = " | ".join(m[1] for m in marks[-5:])
        raise RuntimeError(f"neonctl {' '.join(args)} failed (exit {proc.returncode}): {err[-500:]}")
    return out, dt, marks


def free_port() -> int:
    """A free loopback port away from 55432+ (where concurrent neonctl users race), per process."""
    base = 57000 + (os.getpid() * 13) % 3000
    port, = ports.allocate(base, set())
    return port


# -- sizes and logs ----------------------------------------------------------------------------------


def du_bytes(*paths: Path, apparent: bool = False, exclude: str | None = None) -> int:
    """`du -s`: allocated bytes (or --apparent-size) of the given paths together, links counted once."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if not existing:
        return 0
    flags = ["-s", "-c", "-b"] if apparent else ["-s", "-c", "-B1"]
    if exclude:
        flags.append(f"--exclude={exclude}")
    # no check: a live data directory's temporary files may vanish during the walk (du exits 1)
    out = subprocess.run(["du", *flags, *existing], capture_output=True, text=True, check=False).stdout
    return int(out.strip().splitlines()[-1].split()[0])


def log_problems(path: Path, limit: int = 8) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln.strip()[:300] for ln in lines if LOG_PROBLEM.search(ln) and not OUR_POLLING.search(ln)][:limit]


def redo_info(text: str) -> dict:
    """WAL replayed at a Postgres start, from its log: `redo starts at X` ... `redo done at Y`."""
    out: dict = {}
    starts = re.findall(r"redo starts at ([0-9A-F]+/[0-9A-F]+)", text)
    done = re.findall(r"redo done at ([0-9A-F]+/[0-9A-F]+).*?elapsed: ([\d.]+) s", text)
    if starts:
        out["redo_start"] = starts[-1]
    if done:
        out["redo_done"], out["redo_s"] = done[-1][0], float(done[-1][1])
    if starts and done:
        out["wal_replayed_bytes"] = parse_lsn(done[-1][0]) - parse_lsn(starts[-1])
    elif not starts and "database system was shut down at" in text:
        out["wal_replayed_bytes"] = 0  # a clean start: no redo at all
    m = re.findall(r"checkpoint complete:.*?total=([\d.]+) s", text)
    if m and "end-of-recovery" in text:
        out["end_of_recovery_checkpoint_s"] = float(m[-1])
    return out


def kill_strays(prefixes: list[str]) -> list[int]:
    """SIGKILL any process whose command line names a path under one of `prefixes` (ours only)."""
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(f"{p}/" in cmd for p in prefixes):
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except OSError:
                pass
    return killed


# -- vanilla Postgres --------------------------------------------------------------------------------


class Vanilla:
    """A plain initdb data directory (same initdb options as `neonctl init`) run by the same user."""

    def __init__(self, rt: PgRuntime, root: Path, name: str):
        self.rt = rt
        self.dir = root / name
        self.pgdata = self.dir / "pgdata"
        self.logfile = self.dir / "postgres.log"
        self.port: int | None = None
        self.base_conf = ""

    def init(self) -> None:
        self.dir.mkdir(parents=True)
        os.chmod(self.dir, 0o755)
        self.pgdata.mkdir(mode=0o700)
        self.rt.chown(self.dir, recursive=True)
        self.rt.run([self.rt.bin("initdb"), "-D", str(self.pgdata), "-U", "postgres", "--auth=trust",
                     "-E", "UTF8", "--locale=C", "-N"])
        self.base_conf = (self.pgdata / "postgresql.conf").read_text()

    def configure(self, project: Project, fsync: bool = True, extra: str = "") -> None:
        """The compute's settings (compute_config) minus the synchronous standby, plus `extra`."""
        if self.port is None:
            self.port = free_port()
        conf = compute_config(project, self.port, self.dir, fsync)
        conf, n = re.subn(r"(?m)^synchronous_standby_names\s*=.*$",
                          "synchronous_standby_names = ''  # vanilla peer: no standby", conf)
        assert n == 1, "compute_config no longer sets synchronous_standby_names"
        (self.pgdata / "postgresql.conf").write_text(self.base_conf + conf + extra + "\n")
        self.rt.chown(self.pgdata / "postgresql.conf")

    def start(self, timeout: int = 120) -> float:
        t = time.perf_counter()
        self.rt.run([self.rt.bin("pg_ctl"), "start", "-w", "-t", str(timeout), "-D", str(self.pgdata),
                     "-l", str(self.logfile)], timeout=timeout + 60)
        return time.perf_counter() - t

    def stop(self, mode: str = "fast") -> None:
        if postgres_pid(self.pgdata):
            self.rt.run([self.rt.bin("pg_ctl"), "stop", "-w", "-t", "120", "-m", mode, "-D", str(self.pgdata)],
                        timeout=180)

    def kill(self) -> None:
        pid = postgres_pid(self.pgdata)
        if pid:
            try:
                self.stop("immediate")
            except Exception:  # noqa: BLE001
                os.kill(pid, signal.SIGKILL)


# -- neonctl ------------------------------------------------------------------------------------------


def timeline_of(p: Project, branch: str) -> str:
    return p.branch(branch).timeline_id


def sk_flush(p: Project, tl: str) -> int:
    return max(SafekeeperClient(i, a).timeline(tl)["flush_lsn"]
               for i, a in p.safekeeper_addrs().items())


def wait_pageserver(p: Project, branch: str, timeout: float = 900, layers: bool = True) -> float:
    """Wait until the pageserver holds all WAL the safekeepers have (and, with `layers`, has turned it
    into layers, so its ingest no longer competes for the CPU); return the seconds waited."""
    tl = timeline_of(p, branch)
    flush = sk_flush(p, tl)
    t = time.monotonic()
    while True:
        info = PageserverClient(p.pageserver_addr).timeline(tl)
        done = info["received_lsn"] >= flush and info["last_record_lsn"] > 0
        if done and layers and info.get("layer_lsn") is not None:
            done = info["layer_lsn"] >= info["last_record_lsn"]
        if done:
            return time.monotonic() - t
        if time.monotonic() - t > timeout:
            raise RuntimeError(f"pageserver did not catch up on {branch} within {timeout:.0f}s: {info} "
                               f"(safekeepers flushed {flush})")
        time.sleep(0.1)


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


REBUILT_MSG = re.compile(r"rebuilt from the stopped compute's directory: (\d+) changed page\(s\) rewritten from the "
                        r"image, (?:(\d+) left to the replay's page images, )?(\d+) bytes of WAL to replay")
WARM_MSG = "the stopped compute's directory is exactly this point"


def pool_dirs(p: Project) -> int:
    """How many stopped compute directories the project's pool holds now (compute/dir_pool.py)."""
    return len(dir_pool.slots(directory_pool(p)))


class StartWatch:
    """The progress callback of start_endpoint (or of what calls it: reset_branch, restore_branch): when each
    phase began, and how the data directory was made, from the start's own messages. `hooks` maps a message
    prefix to a function run once, at the first such message (e.g. to measure the materialised directory when
    Postgres is about to be launched on it); their time is kept in `paused`, for the caller to take out of its
    timing (each phase's mark is taken before its hook)."""

    def __init__(self, hooks: dict | None = None):
        self.marks: dict[str, float] = {}
        self.lines: list[str] = []
        self.hooks = dict(hooks or {})
        self.paused = 0.0

    def __call__(self, msg: str) -> None:
        now = time.perf_counter()
        self.lines.append(msg)
        key = "materialise" if msg.startswith("materialising") else "pg_ctl" if msg.startswith(
            "starting PostgreSQL") else msg
        self.marks.setdefault(key, now)
        for prefix in [h for h in self.hooks if msg.startswith(h)]:
            self.hooks.pop(prefix)()
            self.paused += time.perf_counter() - now
            now = time.perf_counter()

    def first(self, prefix: str) -> float | None:
        return next((t for k, t in self.marks.items() if k.startswith(prefix)), None)

    def made(self, pool_before: int) -> dict:
        """{"made": "warm" | "rebuilt" | "full" | "full, empty dir", ...}: `full` rewrote a kept directory's
        files, `full, empty dir` created every file (the pool held no directory when the start began)."""
        for line in self.lines:
            if line.startswith(WARM_MSG):
                return {"made": "warm"}
            m = REBUILT_MSG.match(line)
            if m:
                return {"made": "rebuilt", "changed_pages": int(m.group(1)), "left_to_replay": int(m.group(2) or 0),
                        "rebuild_wal_bytes": int(m.group(3))}
        if "materialise" not in self.marks:
            return {"made": None}
        return {"made": "full" if pool_before else "full, empty dir"}


def endpoint_start(p: Project, branch: str, fsync: bool = False, at_pg_start=None) -> dict:
    """`endpoint start` through the engine API, timed and split into phases, with how its data directory was
    made (warm / rebuilt / full restore) and the redo from its log. `at_pg_start()` runs as Postgres is about to
    be launched on the materialised directory; its time is not counted."""
    for attempt in range(3):
        port = free_port()
        watch = StartWatch({"starting PostgreSQL": at_pg_start} if at_pg_start else None)
        pool_before = pool_dirs(p)
        t0 = time.perf_counter()
        try:
            st = start_endpoint(p, branch, port=port, fsync=fsync, progress=watch)
        except (Conflict, PostgresError) as e:  # lost a race for the port: measure again
            if attempt == 2 or "port" not in (str(e) + str(getattr(e, "hint", ""))).lower():
                raise
            log(f"  port {port} taken meanwhile ({e}); again")
            continue
        t1 = time.perf_counter()
        break
    PASSWORDS[st.port] = get_role(p, "postgres").password
    marks = watch.marks
    out: dict = {"total_s": t1 - t0 - watch.paused, "port": st.port, "pgdata": st.pgdata, "start_lsn": st.start_lsn,
                 "pool_dirs_before": pool_before, **watch.made(pool_before)}
    if "materialise" in marks and "pg_ctl" in marks:
        out.update(elect_s=marks["materialise"] - t0, materialise_s=marks["pg_ctl"] - marks["materialise"],
                   pg_ctl_verify_attach_s=t1 - marks["pg_ctl"] - watch.paused)
    out.update(redo_info((Path(st.pgdata).parent / "postgres.log").read_text(errors="replace")))
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def endpoint_stop(p: Project, branch: str, problems: list[str]) -> None:
    st = read_state(p, branch)
    if st is not None:
        problems.extend(log_problems(Path(st.pgdata).parent / "postgres.log"))
    stop_endpoint(p, branch)


def create_image(p: Project, branch: str, timeout: float = 1800) -> tuple[dict, float]:
    t = time.perf_counter()
    info = PageserverClient.of(p).create_image(timeline_of(p, branch), timeout=timeout)
    return info, time.perf_counter() - t


# -- the environment --------------------------------------------------------------------------------


class BenchEnv:
    def __init__(self, args, kind: str):
        self.args = args
        self.rt = resolve_runtime(args.pg_bin)
        self.home = Path(tempfile.mkdtemp(prefix=f"neonctl-{kind}-"))  # 0700: computes go to /var/lib/neonctl
        os.environ["NEONCTL_HOME"] = str(self.home)
        self.vroot = Path(tempfile.mkdtemp(prefix="run-", dir=shared_dir(kind)))
        os.chmod(self.vroot, 0o755)
        self.projects: list[Project] = []
        self.vanillas: list[Vanilla] = []
        self.problems: dict[str, list[str]] = {}
        self.result: dict = {"pg_version": self.rt.version_string, "pg_bin": str(self.rt.bin_dir),
                             "cpus": os.cpu_count(), "load_start": loadavg(), "quick": args.quick}

    def project(self, name: str, pageserver: dict | None = None, safekeepers: int = 1, attempts: int = 3) -> Project:
        """Create and start a project (pageserver settings `pageserver` written before its first start);
        re-create it if a daemon lost its port to another session's daemon."""
        for attempt in range(attempts):
            log(f"neonctl: creating project {name} with {safekeepers} safekeeper(s) ...")
            p = create_project(name, pg_bin=self.args.pg_bin, safekeepers=safekeepers, progress=lambda m: log(f"  {m}"))
            self.projects.append(p)
            self._move_ports(p)
            if pageserver:
                cfg = PageserverConfig()
                for k, v in pageserver.items():
                    setattr(cfg, k, v)
                cfg.save(p.dir / "pageserver")
            try:
                start_storage(p, progress=lambda m: log(f"  {m}"))
                time.sleep(1.0)
                dead = [d.name for d in p.daemons() if d.pid() is None]
                logs = "; ".join(f"{d}: {log_tail(p.daemon(d).log_file, 1)}" for d in dead)
            except DaemonError as e:  # a port taken between allocation and bind
                if attempt == attempts - 1:
                    self.teardown(p)
                    raise
                dead, logs = ["?"], str(e)
            except Exception:
                self.teardown(p)
                raise
            if not dead:
                return p
            self.teardown(p)
            if attempt == attempts - 1:
                raise RuntimeError(f"daemons of project {name} died right after start: {logs}")
            log(f"  {', '.join(dead)} died right after start ({logs}); re-creating the project")
        raise AssertionError("unreachable")

    def _move_ports(self, p: Project) -> None:
        """Daemon ports away from neonctl's defaults (64000+, 5454+, 50051+), where other sessions' projects
        (other NEONCTL_HOMEs, invisible to create_project's allocation) race for the same ports."""
        base = 20000 + random.randrange(0, 400) * 20
        taken = {pp.config.pageserver_port for pp in self.projects if pp is not p}
        n = len(p.config.safekeepers)
        got = ports.allocate(base, taken, 2 + n)
        p.config.pageserver_port, p.config.broker_port = got[0], got[1]
        for sk, port in zip(p.config.safekeepers, got[2:], strict=False):
            sk["port"] = port
        p.save()

    def storage_dirs(self, p: Project) -> dict[str, Path]:
        out = {"pageserver": p.dir / "pageserver"}
        for sk in p.config.safekeepers:
            out[f"sk{sk['id']}"] = p.safekeeper_dir(sk["id"])
        return out

    def vanilla(self, name: str) -> Vanilla:
        v = Vanilla(self.rt, self.vroot, name)
        self.vanillas.append(v)
        log(f"vanilla: initdb {v.pgdata} ...")
        v.init()
        return v

    def teardown(self, p: Project) -> None:
        if p in self.projects:
            self.projects.remove(p)
        if self.args.keep_logs:
            for f in p.dir.rglob("*.log"):
                dest = self.args.keep_logs / p.name / f.relative_to(p.dir)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest)
        try:
            delete_project(p)
            return
        except Exception as e:  # noqa: BLE001 - fall back to brute force, leave nothing running
            log(f"delete_project({p.name}) failed: {e}; killing what is left")
        try:
            stop_storage(p, immediate=True)
        except Exception as e:  # noqa: BLE001
            log(f"stop_storage({p.name}) failed: {e}")
        shutil.rmtree(p.compute_root(), ignore_errors=True)
        shutil.rmtree(p.dir, ignore_errors=True)

    def collect_logs(self) -> None:
        for p in self.projects:
            for f in sorted(p.dir.rglob("*.log")):
                probs = log_problems(f)
                if probs:
                    self.problems[f"{p.name}/{f.relative_to(p.dir)}"] = probs
        for v in self.vanillas:
            probs = log_problems(v.logfile)
            if probs:
                self.problems[f"vanilla {v.dir.name}/postgres.log"] = probs

    def cleanup(self) -> None:
        for v in self.vanillas:
            try:
                v.kill()
            except Exception as e:  # noqa: BLE001
                log(f"cannot stop vanilla server {v.pgdata}: {e}")
        compute_roots = [str(p.compute_root()) for p in self.projects]
        for p in list(self.projects):
            try:
                self.teardown(p)
            except Exception as e:  # noqa: BLE001
                log(f"cannot delete project {p.name}: {e}")
        strays = kill_strays([str(self.home), str(self.vroot), *compute_roots])
        if strays:
            log(f"killed stray processes {strays}")
            self.problems["cleanup"] = [f"killed stray processes: {strays}"]
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(self.vroot, ignore_errors=True)
        for r in compute_roots:
            shutil.rmtree(r, ignore_errors=True)


# -- pgbench TPS: neonctl against vanilla (bench_skeleton, bench_quorum) -----------------------------

MODES = (("TPC-B", []), ("-N", ["-N"]))


def load_pgbench(env: BenchEnv, configs: list[tuple], up, down, settle) -> None:
    """`pgbench -i` at --scale through each configuration (`up(cfg)` starts its server and returns the port,
    `down(cfg)` stops it); `settle(cfg)` then waits until its storage has taken the load in."""
    for cfg in configs:
        port = up(cfg)
        log(f"{cfg[0]}: pgbench -i -s {env.args.scale} ...")
        t = time.perf_counter()
        pgbench(env.rt, port, ["-i", "-s", str(env.args.scale), "-q"], timeout=1800)
        log(f"  loaded in {time.perf_counter() - t:.1f}s; database {mb(db_bytes(port))} MB")
        down(cfg)
        settle(cfg)


def tps_rounds(env: BenchEnv, configs: list[tuple], up, down, around_run) -> tuple[dict, dict]:
    """`pgbench -T` in both MODES on every configuration (its label first in the tuple), --rounds times.

    The configurations alternate (A B C, then C B A, ...), each segment on a freshly started server, the modes
    alternating within it, a CHECKPOINT before every run: neither order nor a warm cache favours one side.
    `around_run(cfg)` is called before each run and returns `after(result) -> str`, which adds the
    configuration's own measurements to the run's result and says them for the log.
    Returns (runs by label and mode, the SETTINGS of each configuration).
    """
    a = env.args
    width = max(len(c[0]) for c in configs)
    runs: dict[str, dict[str, list[dict]]] = {c[0]: {m: [] for m, _ in MODES} for c in configs}
    seen: dict[str, dict] = {}
    for rnd in range(a.rounds):
        order = configs if rnd % 2 == 0 else configs[::-1]
        for ci, cfg in enumerate(order):
            label = cfg[0]
            port = up(cfg)
            seen.setdefault(label, settings(port))
            for mname, margs in MODES if (rnd + ci) % 2 == 0 else MODES[::-1]:
                sql(port, "CHECKPOINT")
                after = around_run(cfg)
                la = os.getloadavg()[0]
                log(f"round {rnd + 1}/{a.rounds} {label:<{width}} {mname:<6} {a.seconds}s ...")
                out = pgbench(env.rt, port, ["-c", str(a.clients), "-j", str(a.jobs), "-T", str(a.seconds), *margs],
                              timeout=a.seconds + 300)
                r = parse_pgbench(out)
                r.update(round=rnd + 1, load1_before=round(la, 2), load1_after=round(os.getloadavg()[0], 2))
                extra = after(r)
                runs[label][mname].append(r)
                log(f"  tps {r['tps']:.0f}  latency {r['latency_ms']} ms  failed {r['failed']}{extra}")
            down(cfg)
    return runs, seen


def tps_result(env: BenchEnv, runs: dict, seen: dict, ratios: list[tuple[str, str]],
               target: tuple[str, float]) -> dict:
    """Mean TPS per configuration and mode, the ratios `num / den`, and whether the ratio named in `target`
    reached its value."""
    a = env.args
    mean = {label: {m: round(statistics.mean(r["tps"] for r in rs), 1) for m, rs in ms.items()}
            for label, ms in runs.items()}
    ratio = {f"{num} / {den}": {m: round(mean[num][m] / mean[den][m], 3) for m, _ in MODES} for num, den in ratios}
    key, goal = target
    return {"scale": a.scale, "clients": a.clients, "jobs": a.jobs, "seconds": a.seconds, "rounds": a.rounds,
            "mean_tps": mean, "ratios": ratio, "runs": runs, "settings": seen,
            "target": {"ratio": goal, "of": key, "met": {m: v >= goal for m, v in ratio[key].items()}}}


def render_tps(t: dict) -> list[str]:
    """The TPS table of a tps_result: mean (runs) and load per configuration, the ratios, differing settings."""
    width = max(len(label) for label in t["runs"]) + 4
    rwidth = max(len(k) for k in t["ratios"]) + 4
    out = ["", (f"pgbench TPS: scale {t['scale']}, -c {t['clients']} -j {t['jobs']}, {t['seconds']} s per run, "
                f"{t['rounds']} round(s) alternated; mean (runs)"),
           f"{'configuration':<{width}}{'TPC-B':>9}  {'':<16}{'-N':>9}  {'':<16}{'load1':>11}"]
    for label, ms in t["runs"].items():
        cells = []
        for m, _ in MODES:
            each = "(" + " ".join(f"{r['tps']:.0f}" for r in ms[m]) + ")"
            cells.append(f"{t['mean_tps'][label][m]:>9.0f}  {each:<16}")
        loads = [r["load1_before"] for m in ms.values() for r in m]
        out.append(f"{label:<{width}}{''.join(cells)}{min(loads):>5.1f}-{max(loads):<5.1f}")
    out.append("")
    out.append(f"{'ratio':<{rwidth}}{'TPC-B':>7}{'-N':>7}")
    goal = t["target"]
    for k, v in t["ratios"].items():
        mark = ""
        if k == goal["of"]:
            mark = f"   target >= {goal['ratio']}: " + ", ".join(f"{m} {'met' if ok else 'MISSED'}"
                                                               for m, ok in goal["met"].items())
        out.append(f"{k:<{rwidth}}{v['TPC-B']:>7.2f}{v['-N']:>7.2f}{mark}")
    diffs = {n: {lb: s.get(n) for lb, s in t["settings"].items()} for n in SETTINGS}
    diffs = {n: v for n, v in diffs.items() if len(set(v.values())) > 1}
    out.append("settings that differ between configurations:" + ("" if diffs else " none"))
    out.extend(f"  {n}: " + ", ".join(f"{lb} {v!r}" for lb, v in vs.items()) for n, vs in diffs.items())
    return out


def parse_tps_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse with the pgbench TPS options added; their defaults are smaller with --quick."""
    ap.add_argument("--seconds", type=int, help="seconds per pgbench run (default 15; --quick 3)")
    ap.add_argument("--rounds", type=int, help="rounds over the configurations (default 2; --quick 1)")
    ap.add_argument("--scale", type=int, help="pgbench scale for TPS (default 10; --quick 2)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    a.seconds = a.seconds or (3 if a.quick else 15)
    a.rounds = a.rounds or (1 if a.quick else 2)
    a.scale = a.scale or (2 if a.quick else 10)
    return a


# -- running a benchmark ----------------------------------------------------------------------------


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark has; its docstring's first paragraph is the description."""
    ap = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog="Everything runs in a fresh temporary NEONCTL_HOME and vanilla directory, removed at the end together "
               "with every project and server started from them, also on failure, Ctrl-C or SIGTERM. Progress goes to "
               "stderr, the table to stdout (with --json: JSON on stdout, the table on stderr).")
    ap.add_argument("--pg-bin", help="PostgreSQL bin directory (default: the embedded PG 18)")
    ap.add_argument("--quick", action="store_true", help="a fast smoke run; numbers are not representative")
    ap.add_argument("--json", action="store_true", help="print JSON on stdout (the table goes to stderr)")
    ap.add_argument("--keep-logs", type=Path, help="copy the daemon logs into this directory before cleanup")
    return ap


def run_benchmark(args, kind: str, body, render) -> int:
    """Run `body(env)` in a fresh BenchEnv; print the table (and JSON with --json); always clean up.

    The table is the run's header line, the lines `render(result)` makes of the benchmark's own parts, and the
    problems found in the logs.
    """

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    env = None
    rc = 0
    try:
        env = BenchEnv(args, kind)
        log(f"PostgreSQL {env.rt.version_string} from {env.rt.bin_dir}; NEONCTL_HOME={env.home}; "
            f"vanilla servers under {env.vroot}")
        body(env)
    except BaseException as e:  # noqa: BLE001 - report, clean up, exit non-zero
        rc = 130 if isinstance(e, KeyboardInterrupt) else 1
        log(f"benchmark failed: {type(e).__name__}: {e}")
        traceback.print_exc(file=sys.stderr)
        if env is not None:
            env.result["error"] = f"{type(e).__name__}: {e}"
    finally:
        if env is not None:
            try:
                env.collect_logs()
            except Exception as e:  # noqa: BLE001
                log(f"cannot scan logs: {e}")
            log("cleaning up ...")
            env.cleanup()
            log("cleaned up")
    if env is None:
        return rc or 1
    res = env.result
    res["load_end"] = loadavg()
    res["log_problems"] = env.problems
    text = "\n".join([render_header(res), *render(res), *render_footer(res)])
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(res, indent=1, default=str))
    else:
        print(text)
    return rc


def render_header(res: dict) -> str:
    return (f"PostgreSQL {res['pg_version']} ({res['pg_bin']}), {res['cpus']} CPUs, load average at start "
            f"{res['load_start']}, at end {res.get('load_end')}"
            + ("  [--quick: NOT representative]" if res["quick"] else ""))


def render_footer(res: dict) -> list[str]:
    out = []
    if res.get("log_problems"):
        out.append("")
        out.append("log lines with ERROR/WARNING/FATAL/PANIC/Traceback:")
        for f, lines in res["log_problems"].items():
            out.append(f"  {f}:")
            out.extend(f"    {ln}" for ln in lines)
    if res.get("error"):
        out.append("")
        out.append(f"FAILED: {res['error']}")
    return out
