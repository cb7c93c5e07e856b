"""`neonctl endpoint start|stop|list`, `connection-string` and `psql`.

A branch argument may name a point, `BRANCH@LSN` or `BRANCH@TIMESTAMP`: that is a read-only
time-travel endpoint (engine/compute/time_travel.py), named `BRANCH@X/Y` after the resolved LSN.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated

import typer

from neonctl.commands.common import OutputOpt, ProjectOpt
from neonctl.engine.lsn import format_lsn, parse_lsn
from neonctl.engine.project import default_branch_for, load_project
from neonctl.engine.timepoint import TimePoint, parse_ref, parse_timestamp
from neonctl.errors import InvalidInput
from neonctl.output import Format, emit, info

app = typer.Typer(help="Postgres computes on branches.", no_args_is_help=True)

BranchArg = Annotated[
    str, typer.Argument(help="Branch name, or BRANCH@LSN|BRANCH@TIMESTAMP for read-only time travel.")
]
OptBranchArg = Annotated[
    str | None,
    typer.Argument(
        help="Branch name, or BRANCH@LSN|BRANCH@TIMESTAMP "
        "(default: the .neon context's branch, else the default branch)."
    ),
]
COLUMNS = ["endpoint", "port", "status", "mode", "start_lsn", "suspend_timeout", "connection_string"]
SuspendOpt = Annotated[
    int | None,
    typer.Option(
        "--suspend-timeout",
        help="Seconds without a client before the proxy suspends the compute (0 = never; "
        "default: the branch's, else the project's, 300).",
    ),
]


def endpoint_row(p, st, status: str = "running") -> dict:
    from neonctl.engine.compute.scale_to_zero import effective_suspend_timeout  # noqa: PLC0415
    from neonctl.engine.connection import direct_uri  # noqa: PLC0415

    return {
        "endpoint": st.name,
        "branch": st.branch,
        "port": st.port,
        "status": status,
        "mode": "read-write" if st.at_lsn is None else "read-only",
        "start_lsn": format_lsn(st.start_lsn),
        "suspend_timeout": effective_suspend_timeout(p, st),
        "pg_version": st.pg_version,
        "timeline_id": st.timeline_id,
        "connection_string": direct_uri(p, st.port),
        "pgdata": st.pgdata,
        "suspended_at": None,
    }


def _point(ref: str, lsn: str | None = None, timestamp: str | None = None) -> TimePoint:
    point = parse_ref(ref)
    if lsn is not None and timestamp is not None:
        raise InvalidInput("give --lsn or --timestamp, not both")
    if (lsn is not None or timestamp is not None) and (point.lsn is not None or point.timestamp is not None):
        raise InvalidInput(f"the point is given twice (in {ref!r} and in --lsn/--timestamp)")
    return TimePoint(
        point.branch, parse_lsn(lsn) if lsn else point.lsn, parse_timestamp(timestamp) if timestamp else point.timestamp
    )


@app.command("start")
def start_cmd(
    branch: BranchArg = "main",
    port: Annotated[int | None, typer.Option("--port", help="Port (default: first free from 55432).")] = None,
    fsync: Annotated[
        bool, typer.Option("--fsync/--no-fsync", help="fsync in the compute (its data dir is a disposable cache).")
    ] = False,
    lsn: Annotated[str | None, typer.Option("--lsn", help="Read-only time travel: the branch as of this LSN.")] = None,
    timestamp: Annotated[
        str | None, typer.Option("--timestamp", help="Read-only time travel: the branch as of this time.")
    ] = None,
    suspend_timeout: SuspendOpt = None,
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Materialise the branch from storage and start Postgres on it (read-only at a past point: --lsn/--timestamp)."""
    from neonctl.engine.compute.endpoint import start_endpoint  # noqa: PLC0415
    from neonctl.engine.compute.time_travel import start_time_travel  # noqa: PLC0415

    p = load_project(project)
    point = _point(branch, lsn, timestamp)
    if point.lsn is None and point.timestamp is None:
        st = start_endpoint(
            p,
            point.branch or p.config.default_branch,
            port=port,
            fsync=fsync,
            progress=info,
            suspend_timeout=suspend_timeout,
        )
    else:
        st, _ = start_time_travel(p, point, port=port, progress=info)
    emit(endpoint_row(p, st), output, COLUMNS)


@app.command("stop")
def stop_cmd(
    branch: BranchArg = "main",
    immediate: Annotated[bool, typer.Option("--immediate", help="Immediate shutdown (like a crash).")] = False,
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Stop Postgres and delete its data directory (storage keeps everything)."""
    from neonctl.engine.compute.endpoint import read_state, stop_endpoint  # noqa: PLC0415
    from neonctl.engine.compute.time_travel import endpoint_name, resolve_point  # noqa: PLC0415

    p = load_project(project)
    name = branch
    if "@" in branch and read_state(p, branch) is None:  # a time or an unresolved LSN: find its record end
        b, at = resolve_point(p, _point(branch))
        name = endpoint_name(b.name, at)
    st = stop_endpoint(p, name, immediate=immediate)
    emit({"endpoint": st.name, "branch": st.branch, "port": st.port, "status": "stopped"}, output)


@app.command("list")
def list_cmd(project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """List endpoints: running, crashed, or suspended by the proxy (the next connection wakes them)."""
    from neonctl.engine.compute.endpoint import list_endpoints  # noqa: PLC0415
    from neonctl.engine.compute.scale_to_zero import suspended_endpoints  # noqa: PLC0415

    p = load_project(project)
    rows = [endpoint_row(p, st, s) for st, s in list_endpoints(p)]
    running = {r["endpoint"] for r in rows}
    rows += [
        {
            "endpoint": s["endpoint"],
            "branch": s["branch"],
            "port": None,
            "status": "suspended",
            "mode": "read-write" if "@" not in s["endpoint"] else "read-only",
            "start_lsn": None,
            "suspend_timeout": s["suspend_timeout"],
            "pg_version": None,
            "timeline_id": None,
            "connection_string": None,
            "pgdata": None,
            "suspended_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s["suspended_at"])),
        }
        for s in suspended_endpoints(p)
        if s["endpoint"] not in running
    ]
    emit(rows, output, COLUMNS)


def connection_string(
    branch: OptBranchArg = None,
    pooled: Annotated[
        bool, typer.Option("--pooled", help="Through the proxy to the branch's PgBouncer (transaction pooling).")
    ] = False,
    direct: Annotated[
        bool,
        typer.Option(
            "--direct", help="The compute's own port instead of the proxy (it must run; a point in time starts one)."
        ),
    ] = False,
    serverless: Annotated[
        bool,
        typer.Option(
            "--serverless",
            help="Also the neonConfig settings for the @neondatabase/serverless driver (HTTP /sql and WebSocket).",
        ),
    ] = False,
    role: Annotated[str, typer.Option("--role", help="Role to connect as.")] = "postgres",
    database: Annotated[str, typer.Option("--database", "--db", help="Database to connect to.")] = "postgres",
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Print the branch's connection string: the proxy's by default, which wakes the compute on connect."""
    from neonctl.engine.connection import (  # noqa: PLC0415
        connection_info,
        serverless_config,
        serverless_snippet,
    )

    p = load_project(project)
    branch = default_branch_for(p, branch)
    if serverless and (pooled or direct):
        raise InvalidInput("--serverless gives the proxy's URI: it goes with neither --pooled nor --direct")
    res = connection_info(p, branch, pooled=pooled, direct=direct, role=role, database=database, progress=info)
    if serverless:
        res = {"connection_string": res["connection_string"], "neon_config": serverless_config(p)}
    if output == Format.table:
        print(res["connection_string"])
        if serverless:
            print(serverless_snippet(res["neon_config"]))
    else:
        emit(res, output)


def psql(
    branch: OptBranchArg = None,
    args: Annotated[list[str] | None, typer.Argument(help="Extra psql arguments (after --).")] = None,
    project: ProjectOpt = None,
) -> None:
    """Run psql on the branch through the proxy (which wakes its compute)."""
    from neonctl.engine.connection import connection_info  # noqa: PLC0415

    p = load_project(project)
    branch = default_branch_for(p, branch)
    uri = connection_info(p, branch, progress=info)["connection_string"]
    psql_bin = p.runtime().bin("psql")
    info(f"connecting to {branch} through the proxy at {p.proxy_addr}")
    sys.stdout.flush()
    os.execv(psql_bin, [psql_bin, uri, *(args or [])])
