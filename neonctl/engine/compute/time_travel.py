"""Time-travel endpoints: a read-only Postgres frozen at a point of a branch's history (`branch@LSN|TIME`).

Like Neon's time-travel connections. The pageserver materialises a data
directory at the point exactly as for a read-write start (its WAL is zeroed
after the point and no later segment exists), but the compute starts as a
**hot standby** (`standby.signal`, `hot_standby = on`, no primary_conninfo,
no restore_command): it replays to the point, then waits forever for WAL that
never comes. It never streams to the safekeepers and never becomes the
branch's writer, so any number of them can run next to the branch's own
compute. Their identity is `branch@X/Y` (the resolved record end); they live
in their own state files (`endpoints/branch@X_Y.json`) with their own ports.

Postgres accepts read-only connections as soon as the replay is consistent -
which, for a base image that was shut down cleanly, is long before the
target. So a start only returns once `pg_last_wal_replay_lsn()` reached it.
"""

from __future__ import annotations

import time

from neonctl.engine.compute.endpoint import (
    EndpointState,
    claim_port,
    compute_config,
    endpoint_status,
    launch_postgres,
    list_endpoints,
    new_compute_dir,
    previous_compute,
    read_state,
    save_state,
)
from neonctl.engine.lsn import format_lsn
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.project import Branch, Project
from neonctl.engine.safekeeper.client import flush_lsn
from neonctl.engine.storage import require_running
from neonctl.engine.timepoint import TimePoint, to_pg_us
from neonctl.errors import Conflict, InvalidInput, PostgresError, Timeout

STANDBY_SETTINGS = "\n".join([
    "# --- time travel: a hot standby frozen at its point; it never streams and never writes ---",
    "hot_standby = on",
    "synchronous_standby_names = ''",
    "primary_conninfo = ''",
    "restore_command = ''",
    "wal_retrieve_retry_interval = 1h  # nothing will ever arrive: do not log 'waiting for WAL' every 5 s",
    "",
])


def endpoint_name(branch: str, lsn: int) -> str:
    return f"{branch}@{format_lsn(lsn)}"


def caught_up_info(project: Project, b: Branch, timeout: float = 30.0) -> dict:
    """The pageserver's view of the branch once it holds all the WAL the safekeepers have."""
    flush = flush_lsn(project, b.timeline_id)
    pageserver = PageserverClient.of(project)
    deadline = time.monotonic() + timeout
    while True:
        info = pageserver.timeline(b.timeline_id)
        if info["received_lsn"] >= flush or info["last_record_lsn"] >= flush:
            return info
        if time.monotonic() > deadline:
            raise Timeout(f"the pageserver has WAL of branch {b.name!r} up to {format_lsn(info['received_lsn'])},"
                          f" waited {timeout:.0f}s for {format_lsn(flush)}")
        time.sleep(0.05)


def resolve_point(project: Project, point: TimePoint) -> tuple[Branch, int]:
    """(branch, LSN) for `branch@LSN|TIME|head`: a record end, where a compute can stop replaying.

    An LSN means "records ending at or before it"; a time means "transactions
    committed at or before it"; neither means the branch's head.
    """
    if point.lsn is not None and point.timestamp is not None:
        raise InvalidInput("give either an LSN or a timestamp, not both")
    b = project.branch(point.branch or project.config.default_branch)
    require_running(project)
    info = caught_up_info(project, b)
    head, start = info["last_record_lsn"], info.get("start_lsn") or info["initdb_lsn"]
    if point.timestamp is not None:
        first = min(x.created_at for x in project.config.branches.values())
        if point.timestamp.timestamp() < first:
            raise InvalidInput(f"timestamp {point.timestamp.isoformat()} is before the project's history begins")
        return b, PageserverClient.of(project).lsn_by_timestamp(b.timeline_id, to_pg_us(point.timestamp))
    if point.lsn is not None:
        if point.lsn > head:
            raise InvalidInput(f"LSN {format_lsn(point.lsn)} is past the head of branch {b.name!r}"
                               f" ({format_lsn(head)})")
        if point.lsn < start:
            raise InvalidInput(f"LSN {format_lsn(point.lsn)} is before branch {b.name!r} begins ({format_lsn(start)})",
                               hint=f"use its parent {b.parent!r}" if b.parent else None)
        return b, PageserverClient.of(project).record_end(b.timeline_id, point.lsn)
    return b, head


def time_travel_endpoints(project: Project, branch: str | None = None) -> list[tuple[EndpointState, str]]:
    return [(st, s) for st, s in list_endpoints(project)
            if st.at_lsn is not None and (branch is None or st.branch == branch)]


def find_running(project: Project, point: TimePoint) -> EndpointState | None:
    """A running endpoint that shows exactly `point`: the branch's own compute for a bare branch, else a
    time-travel endpoint at the resolved LSN."""
    b = project.branch(point.branch or project.config.default_branch)
    if point.lsn is None and point.timestamp is None:
        st = read_state(project, b.name)
        if st is not None and endpoint_status(st) == "running":
            return st
    _, lsn = resolve_point(project, point)
    st = read_state(project, endpoint_name(b.name, lsn))
    return st if st is not None and endpoint_status(st) == "running" else None


def start_time_travel(project: Project, point: TimePoint, port: int | None = None, reuse: bool = False,
                      progress=lambda msg: None) -> tuple[EndpointState, bool]:
    """Start a read-only endpoint at `point`; returns (state, started). With `reuse`, one already running
    at that point is returned instead of refused."""
    with project.lock():
        project.reload()
        b, lsn = resolve_point(project, point)
        name = endpoint_name(b.name, lsn)
        old = previous_compute(project, name, progress)
        if old is not None:
            if reuse:
                return old, False
            raise Conflict(f"time-travel endpoint {name} is already running on port {old.port}")
        port, auto_port = claim_port(port)
        runtime = project.runtime()
        with new_compute_dir(project, name) as epdir:
            pgdata = epdir / "pgdata"
            logfile = epdir / "postgres.log"
            progress(f"materialising {name} (read-only time travel) ...")
            PageserverClient.of(project).basebackup(b.timeline_id, name, lsn=lsn)
            # Standby mode replays everything after the image's checkpoint on its own; a backup_label would
            # make every later shutdown checkpoint in the WAL fatal ("online backup was canceled").
            (pgdata / "backup_label").unlink(missing_ok=True)
            (pgdata / "standby.signal").write_text("")
            port = launch_postgres(
                runtime, pgdata, epdir, logfile, port, auto_port,
                lambda p: compute_config(project, p, epdir, fsync=False) + STANDBY_SETTINGS,
                f"read-only PostgreSQL {runtime.version} for {name}", progress)
            wait_replayed(str(epdir), port, lsn, logfile)
        st = EndpointState(branch=b.name, timeline_id=b.timeline_id, port=port, pgdata=str(pgdata), start_lsn=lsn,
                           started_at=time.time(), pg_version=runtime.version, fsync=False, at_lsn=lsn)
        save_state(project, st)
        return st, True


def wait_replayed(socket_dir: str, port: int, lsn: int, logfile, timeout: float = 120.0, stall: float = 20.0) -> None:
    """Return once the standby replayed up to `lsn`; refuse one that stops short or left recovery."""
    import psycopg  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    with psycopg.connect(host=socket_dir, port=port, user="postgres", dbname="postgres", autocommit=True,
                         connect_timeout=10) as conn:
        while True:
            in_recovery, replayed = conn.execute(
                "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn() - '0/0'::pg_lsn").fetchone()
            replayed = int(replayed or 0)
            if not in_recovery:
                raise PostgresError("time-travel compute left recovery: refusing a writable compute", hint=str(logfile))
            if replayed >= lsn:
                return
            now = time.monotonic()
            if replayed != last:
                last, last_change = replayed, now
            if now - last_change > stall or now > deadline:
                raise PostgresError(f"time-travel compute replayed WAL only up to {format_lsn(replayed)}, short of"
                                    f" {format_lsn(lsn)}: refusing to serve a different point", hint=str(logfile))
            time.sleep(0.02)
