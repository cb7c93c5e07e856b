"""Endpoints: a Postgres compute running on a branch, built from storage at every start.

Start = ask the safekeepers where the branch's WAL ends, ask the pageserver
for a data directory at the last complete record there, configure it afresh
(the compute streams WAL to the safekeepers as a synchronous standby, so a
commit returns only once a quorum fsynced it) and start Postgres. Stop =
shut Postgres down (its final WAL reaches the safekeepers) and delete the
data directory: it was only ever a cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from neonctl.engine import ports
from neonctl.engine.compute import dir_pool, pgbouncer, postmaster
from neonctl.engine.compute.admin_query import query_results
from neonctl.engine.compute.endpoint_state import EndpointState
from neonctl.engine.compute.scale_to_zero import clear_suspended, suspended_endpoints
from neonctl.engine.failpoints import failpoint
from neonctl.engine.lsn import format_lsn
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.process import log_tail, pid_alive, pid_cmdline
from neonctl.engine.project import Project, list_projects
from neonctl.engine.roles import LOGIN_ROLES_SQL, apply_roles
from neonctl.engine.safekeeper.client import SafekeeperClient
from neonctl.engine.safekeeper.election_driver import attach, elect
from neonctl.engine.safekeeper.proposer import quorum
from neonctl.engine.storage import require_running
from neonctl.errors import Conflict, CorruptData, InvalidInput, NeonctlError, NotFound, PostgresError, Timeout

log = logging.getLogger("neonctl.endpoint")
SETTINGS_HEADER = "# --- neonctl compute settings (rewritten at every endpoint start) ---"


def endpoints_dir(project: Project) -> Path:
    d = project.dir / "endpoints"
    d.mkdir(exist_ok=True)
    return d


def _state_path(project: Project, branch: str) -> Path:
    """`branch` is an endpoint name: a branch, or `branch@X/Y` for a time-travel endpoint."""
    return endpoints_dir(project) / f"{branch.replace('/', '_')}.json"


def read_state(project: Project, branch: str) -> EndpointState | None:
    path = _state_path(project, branch)
    try:
        return EndpointState(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:
        raise CorruptData(f"endpoint state file {path} is damaged ({type(e).__name__})",
                          hint="stop its Postgres if one still runs (see its postmaster.pid), then delete the file"
                          ) from None


def postgres_pid(pgdata: str | Path) -> int | None:
    try:
        pid = int((Path(pgdata) / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def endpoint_status(st: EndpointState) -> str:
    return "running" if postgres_pid(st.pgdata) else "crashed"


def _ports_in_use() -> set[int]:
    used = set()
    for p in list_projects():
        for f in (p.dir / "endpoints").glob("*.json") if (p.dir / "endpoints").exists() else []:
            try:
                used.add(json.loads(f.read_text())["port"])
            except (OSError, ValueError, KeyError):
                pass
    return used


# TCP clients authenticate with SCRAM (the project's roles, roles.py); the Unix socket in the compute's 0700
# directory is trusted: only neonctl, the proxy and the safekeepers (same user or root) reach it.
PG_HBA = """# neonctl: rewritten at every endpoint start
local   all          all                   trust
local   replication  all                   trust
host    all          all    127.0.0.1/32   scram-sha-256
host    replication  all    127.0.0.1/32   scram-sha-256
"""


def compute_config(project: Project, port: int, socket_dir: Path, fsync: bool) -> str:
    sks = [f"sk{sk['id']}" for sk in project.config.safekeepers]
    quorum = len(sks) // 2 + 1
    return "\n".join([
        "",
        SETTINGS_HEADER,
        "listen_addresses = '127.0.0.1'",
        "password_encryption = 'scram-sha-256'",
        f"port = {port}",
        f"unix_socket_directories = '{socket_dir}'",
        f"fsync = {'on' if fsync else 'off'}  # durability is the safekeepers' job",
        "synchronous_commit = on",
        "wal_log_hints = on  # every page a hint bit changes is in the WAL: a stopped directory can be rebuilt",
        f"synchronous_standby_names = 'ANY {quorum} ({', '.join(sks)})'",
        "wal_level = replica",
        "max_wal_senders = 10",
        "max_replication_slots = 10",
        "wal_sender_timeout = 60s",
        "recovery_init_sync_method = syncfs",
        "checkpoint_timeout = 2min  # checkpoints are where pageserver images can restart replay",
        "shared_buffers = 128MB",
        "log_line_prefix = '%m [%p] '",
        "",
    ])


def start_endpoint(project: Project, branch: str, port: int | None = None, fsync: bool = False,
                   progress=lambda msg: None, suspend_timeout: int | None = None) -> EndpointState:
    if suspend_timeout is not None and suspend_timeout < 0:
        raise InvalidInput("--suspend-timeout must be >= 0 seconds (0 = never suspend)")
    with project.lock():
        project.reload()
        b = project.branch(branch)
        require_running(project)
        old = previous_compute(project, branch, progress)
        if old is not None:
            raise Conflict(f"endpoint for branch {branch!r} is already running on port {old.port}")
        port, auto_port = claim_port(port)
        runtime = project.runtime()
        elected = elect(project, b.timeline_id, progress)  # a new term; a quorum holds WAL up to its start
        flush = elected.start_lsn
        with new_compute_dir(project, branch) as epdir:
            pgdata = epdir / "pgdata"
            progress(f"materialising {branch} at the end of its WAL ({format_lsn(flush)}) ...")
            pool = directory_pool(project)
            dir_pool.write_limits(pool, project.config.pool_size, project.config.pool_max_mb << 20)
            res = PageserverClient.of(project).basebackup(
                b.timeline_id, branch, wait_for_lsn=flush, recycle=dir_pool.has_directory(pool))
            lsn = res["lsn"]
            if res.get("warm"):
                progress("the stopped compute's directory is exactly this point: reused (no restore, no replay)")
            elif res.get("rebuilt"):
                rb = res["rebuilt"]
                progress(f"rebuilt from the stopped compute's directory: {rb['changed_keys']} changed page(s) "
                         f"rewritten from the image, {rb.get('left_to_replay', 0)} left to the replay's page images, "
                         f"{rb['wal_bytes']} bytes of WAL to replay")
            failpoint("endpoint-start-before-postgres")
            logfile = epdir / "postgres.log"
            port = launch_postgres(
                runtime, pgdata, epdir, logfile, port, auto_port,
                lambda p: compute_config(project, p, epdir, fsync) + f"neonctl.term = {elected.term}\n",
                f"PostgreSQL {runtime.version} on branch {branch!r}", progress)
            logins = verify_replayed(str(epdir), port, lsn, logfile, then_sql=LOGIN_ROLES_SQL)
            attach(project, elected, str(epdir), port, lsn)
            apply_roles(project, str(epdir), port, logins=logins)
            failpoint("endpoint-start-after-postgres")
        st = EndpointState(branch=branch, timeline_id=b.timeline_id, port=port, pgdata=str(pgdata), start_lsn=lsn,
                           started_at=time.time(), pg_version=runtime.version, fsync=fsync,
                           suspend_timeout=suspend_timeout, directory_since_lsn=res.get("directory_since_lsn"))
        save_state(project, st)
        clear_suspended(project, st.name)
        return st


def previous_compute(project: Project, name: str, progress) -> EndpointState | None:
    """The endpoint's compute if it still runs; one that crashed is discarded here, to be rebuilt from storage."""
    old = read_state(project, name)
    if old is not None and endpoint_status(old) != "running":
        progress(f"previous compute of {name!r} is gone (crashed); rebuilding it from storage")
        _discard(project, old)
        return None
    return old


def claim_port(port: int | None) -> tuple[int, bool]:
    """(port, chosen automatically): a port the user asked for must be free now; one chosen here may still be
    taken before Postgres binds it, and then launch_postgres moves on to the next."""
    if port is None:
        port, = ports.allocate(ports.ENDPOINT_BASE_PORT, _ports_in_use())
        return port, True
    if not 1 <= port <= 65535:
        raise InvalidInput(f"invalid port {port}")
    if port in _ports_in_use() or not ports.port_free(port):
        raise Conflict(f"port {port} is already in use")
    return port, False


@contextmanager
def new_compute_dir(project: Project, name: str) -> Iterator[Path]:
    """An empty directory for endpoint `name`'s data directory and log, for a start built inside the block.

    If the start fails, its Postgres is killed and the directory removed: a failed start leaves no half-built
    compute behind (the data directory is only a cache of storage).
    """
    epdir = project.compute_root() / "endpoints" / name.replace("/", "_")
    if epdir.exists():
        stop_untracked_postgres(project, epdir / "pgdata")
        shutil.rmtree(epdir)
    epdir.mkdir(parents=True)
    os.chmod(epdir, 0o700)  # the compute's socket lives here: only its user (and root) may connect
    try:
        yield epdir
    except BaseException:
        pid = postgres_pid(epdir / "pgdata")
        if pid:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(epdir, ignore_errors=True)
        raise


def stop_untracked_postgres(project: Project, pgdata: Path) -> int | None:
    """A Postgres still running in a directory no state file records (a start killed after Postgres started,
    before it saved the state) is stopped, never left beside a second compute for the same branch. Only a
    process whose command line names this data directory is touched."""
    pid = postgres_pid(pgdata)
    if pid is None or str(pgdata) not in pid_cmdline(pid):
        return None
    try:
        postmaster.stop(pgdata, "immediate", timeout=30)
    except Timeout:
        os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while pid_alive(pid) and time.time() < deadline:
        time.sleep(0.02)
    return pid


def save_state(project: Project, st: EndpointState) -> None:
    """Record a started compute atomically: a reader sees the old state file or the complete new one."""
    path = _state_path(project, st.name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(st), indent=1))
    os.replace(tmp, path)


def launch_postgres(runtime, pgdata: Path, epdir: Path, logfile: Path, port: int, auto_port: bool,
                    settings, what: str, progress) -> int:
    """Configure and start Postgres; if an automatically chosen port was taken meanwhile, take the next.

    `settings(port)` returns the neonctl part of postgresql.conf. Returns the port it runs on.
    """
    base_conf = (pgdata / "postgresql.conf").read_text().split(SETTINGS_HEADER, 1)[0]  # a reused directory
    base_conf = base_conf.removesuffix("\n")
    (pgdata / "pg_hba.conf").write_text(PG_HBA)
    for attempt in range(5):
        (pgdata / "postgresql.conf").write_text(base_conf + settings(port))
        runtime.chown(epdir, recursive=True)
        progress(f"starting {what} on port {port} ...")
        try:
            postmaster.start(runtime, pgdata, logfile, timeout=120)
            return port
        except PostgresError as e:
            taken = "could not create any TCP/IP sockets" in log_tail(logfile, 5)
            if auto_port and taken and attempt < 4:  # lost a race for the port: take the next one
                port, = ports.allocate(port + 1, _ports_in_use())
                continue
            raise PostgresError(f"{what} failed to start: {log_tail(logfile)}", hint=str(logfile)) from e
    raise AssertionError("unreachable")


def verify_replayed(socket_dir: str, port: int, lsn: int, logfile: Path, then_sql: str | None = None
                    ) -> list[list[str | None]]:
    """Refuse a compute that did not come up at or after the LSN it was built for.

    Postgres happily starts from a clean base that lacks a backup_label and
    skips all redo - silently, with none of the later data. The end-of-recovery
    checkpoint is written at the target LSN, so a correctly replayed compute
    always inserts at or beyond it. `then_sql` is asked on the same connection (the first backend of a new
    compute costs several ms); its rows are returned.
    """
    sql = "SELECT pg_is_in_recovery(), pg_current_wal_insert_lsn() - '0/0'::pg_lsn"
    results = query_results(socket_dir, port, sql if then_sql is None else f"{sql}; {then_sql}")
    in_recovery, insert = results[0][0]
    if in_recovery == "t" or int(insert) < lsn:
        raise PostgresError(
            f"compute came up at {format_lsn(int(insert))}, before its target {format_lsn(lsn)}:"
            " WAL was not replayed; refusing to serve stale data", hint=str(logfile))
    return results[1] if then_sql is not None else []


def directory_pool(project: Project) -> Path:
    """Where the project's stopped computes' directories are kept for the next starts (compute/dir_pool.py)."""
    return dir_pool.pool_root(project.compute_root())


def forget_recycled(project: Project, timeline_id: str) -> bool:
    """The kept directories of computes that ran on `timeline_id` may no longer be reused or rebuilt from.

    For when the timeline's WAL was cut back below where those computes stopped (a lone safekeeper's repair
    rebuilds it at the pageserver's WAL end): their records go, so no start takes them for a point of the new
    history; the files stay as a pool of inodes that a full materialisation rewrites. Returns whether a record
    was removed.
    """
    return dir_pool.forget_timeline(directory_pool(project), timeline_id) > 0


def _pageserver_running(project: Project) -> bool:
    """Whether the pageserver runs to delete evicted directories in the background (pool_refill_loop)."""
    return any(d.name == "pageserver" and d.pid() is not None for d in project.daemons())


def _keep_for_recycling(project: Project, st: EndpointState, pid: int | None) -> None:
    pgdata = Path(st.pgdata)
    if st.at_lsn is not None or not pgdata.is_dir() or (pid is not None and pid_alive(pid)):
        return  # time travel (its own directories), or a process may still write there
    since = st.start_lsn if st.directory_since_lsn is None else min(st.start_lsn, st.directory_since_lsn)
    try:
        dir_pool.keep(directory_pool(project), pgdata,
                      {"timeline_id": st.timeline_id, "branch": st.branch, "start_lsn": since},
                      project.config.pool_size, project.config.pool_max_mb << 20,
                      defer_removal=_pageserver_running(project))
    except OSError as e:
        log.info("the stopped directory of %s is not kept: %s", st.name, e)  # then it goes with the rest


def _discard(project: Project, st: EndpointState) -> None:
    """Forget a compute: detach the safekeepers, kill stragglers, keep its data directory for recycling."""
    pid = None
    try:  # the postmaster leads a session of its own (postmaster.start): its group holds every backend
        pid = int((Path(st.pgdata) / "postmaster.pid").read_text().split("\n", 1)[0])
        os.killpg(pid, signal.SIGKILL)
        deadline = time.time() + 5
        while pid_alive(pid) and time.time() < deadline:
            time.sleep(0.01)
    except (OSError, ValueError):
        pass
    for sk in SafekeeperClient.all_of(project).values() if st.at_lsn is None else ():  # time travel: no WAL
        try:
            sk.detach_compute(st.timeline_id)
        except NeonctlError as e:  # a stopped safekeeper learns it from the next election
            log.info("%s: could not detach the compute of %s: %s", sk.name, st.name, e)
    pgbouncer.stop(Path(st.pgdata).parent)
    _keep_for_recycling(project, st, pid)
    shutil.rmtree(Path(st.pgdata).parent, ignore_errors=True)
    _state_path(project, st.name).unlink(missing_ok=True)


def stop_endpoint(project: Project, branch: str, immediate: bool = False) -> EndpointState:
    with project.lock():
        project.branch(branch.partition("@")[0])  # `branch@X/Y`: a time-travel endpoint
        st = read_state(project, branch)
        if st is None:
            if any(r["endpoint"] == branch for r in suspended_endpoints(project)):
                clear_suspended(project, branch)  # stopping a suspended endpoint: it stays stopped, not suspended
                return EndpointState(branch=branch.partition("@")[0], timeline_id="", port=0, pgdata="",
                                     start_lsn=0, started_at=0.0, pg_version=0)
            raise NotFound(f"no endpoint is running on branch {branch!r}")
        pid = postgres_pid(st.pgdata)
        failpoint("endpoint-stop-before-postgres")
        if pid and not immediate and st.at_lsn is None:
            _wait_streaming(project, st.timeline_id)
        if pid:
            try:
                postmaster.stop(Path(st.pgdata), "immediate" if immediate else "fast", timeout=60)
            except Timeout:
                if postgres_pid(st.pgdata):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.time() + 10
            while pid_alive(pid) and time.time() < deadline:
                time.sleep(0.05)
        failpoint("endpoint-stop-after-postgres")
        _discard(project, st)
        clear_suspended(project, st.name)
        return st


def _wait_streaming(project: Project, timeline_id: str, timeout: float = 3.0) -> None:
    """Before a clean shutdown: wait until a quorum of safekeepers stream from the compute. A walsender still
    starting up when the shutdown begins is ended with the other backends, and the shutdown checkpoint then
    never reaches storage: the stopped directory would stand past the branch's WAL, and no start could reuse
    it (a compute just started and stopped at once, as a test or a script does)."""
    sks = SafekeeperClient.all_of(project)
    need = quorum(len(sks))
    deadline = time.monotonic() + timeout
    while True:
        streaming = 0
        for sk in sks.values():
            try:
                streaming += bool(sk.timeline(timeline_id, timeout=2).get("streaming"))
            except NeonctlError:
                continue
        if streaming >= need or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def list_endpoints(project: Project) -> list[tuple[EndpointState, str]]:
    out = []
    for f in sorted(endpoints_dir(project).glob("*.json")):
        st = read_state(project, f.stem)
        if st:
            out.append((st, endpoint_status(st)))
    return out


def stop_all_endpoints(project: Project, immediate: bool = False) -> None:
    for st, _ in list_endpoints(project):
        stop_endpoint(project, st.name, immediate=immediate)


def running_endpoint(project: Project, branch: str) -> EndpointState:
    project.branch(branch)
    st = read_state(project, branch)
    if st is None or endpoint_status(st) != "running":
        raise NotFound(f"no endpoint is running on branch {branch!r}", hint=f"run `neonctl endpoint start {branch}`")
    return st
