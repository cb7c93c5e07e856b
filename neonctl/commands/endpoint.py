"""`neonctl endpoint start|stop|list`, `connection-string` and `psql`.

A branch argument may name a point, `BRANCH@LSN` or `BRANCH@TIMESTAMP`: that is a read-only
time-travel endpoint (engine/compute/time_travel.py), named `BRANCH@X/Y` after the resolved LSN.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from neonctl.commands.common import OutputOpt, ProjectOpt
from neonctl.engine.lsn import format_lsn, parse_lsn
from neonctl.engine.project import load_project
from neonctl.engine.timepoint import TimePoint, parse_ref, parse_timestamp
from neonctl.errors import InvalidInput
from neonctl.output import Format, emit, info

app = typer.Typer(help="Postgres computes on branches.", no_args_is_help=True)

BranchArg = Annotated[str, typer.Argument(help="Branch name, or BRANCH@LSN|BRANCH@TIMESTAMP for read-only time travel.")]
COLUMNS = ["endpoint", "port", "status", "mode", "start_lsn", "connection_string"]


def endpoint_row(st, status: str = "running") -> dict:
    return {"endpoint": st.name, "branch": st.branch, "port": st.port, "status": status,
            "mode": "read-write" if st.at_lsn is None else "read-only", "start_lsn": format_lsn(st.start_lsn),
            "pg_version": st.pg_version, "timeline_id": st.timeline_id, "connection_string": st.connection_string,
            "pgdata": st.pgdata}


def _point(ref: str, lsn: str | None = None, timestamp: str | None = None) -> TimePoint:
    point = parse_ref(ref)
    if lsn is not None and timestamp is not None:
        raise InvalidInput("give --lsn or --timestamp, not both")
    if (lsn is not None or timestamp is not None) and (point.lsn is not None or point.timestamp is not None):
        raise InvalidInput(f"the point is given twice (in {ref!r} and in --lsn/--timestamp)")
    return TimePoint(point.branch, parse_lsn(lsn) if lsn else point.lsn,
                     parse_timestamp(timestamp) if timestamp else point.timestamp)


def _endpoint_for(p, ref: str):
    """The running endpoint for `ref`; for a point in time, start a read-only one if none runs there."""
    from neonctl.engine.compute.endpoint import running_endpoint  # noqa: PLC0415
    from neonctl.engine.compute.time_travel import start_time_travel  # noqa: PLC0415

    point = _point(ref)
    if point.lsn is None and point.timestamp is None:
        return running_endpoint(p, point.branch or p.config.default_branch)
    st, started = start_time_travel(p, point, reuse=True, progress=info)
    if started:
        info(f"started read-only time-travel endpoint {st.name} on port {st.port}"
             f" (stop it with `neonctl endpoint stop {st.name}`)")
    return st


@app.command("start")
def start_cmd(
    branch: BranchArg = "main",
    port: Annotated[int | None, typer.Option("--port", help="Port (default: first free from 55432).")] = None,
    fsync: Annotated[bool, typer.Option("--fsync/--no-fsync", help="fsync in the compute (its data dir is a disposable cache).")] = False,
    lsn: Annotated[str | None, typer.Option("--lsn", help="Read-only time travel: the branch as of this LSN.")] = None,
    timestamp: Annotated[str | None, typer.Option("--timestamp", help="Read-only time travel: the branch as of this time.")] = None,
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Materialise the branch from storage and start Postgres on it (read-only at a past point with --lsn/--timestamp)."""
    from neonctl.engine.compute.endpoint import start_endpoint  # noqa: PLC0415
    from neonctl.engine.compute.time_travel import start_time_travel  # noqa: PLC0415

    p = load_project(project)
    point = _point(branch, lsn, timestamp)
    if point.lsn is None and point.timestamp is None:
        st = start_endpoint(p, point.branch or p.config.default_branch, port=port, fsync=fsync, progress=info)
    else:
        st, _ = start_time_travel(p, point, port=port, progress=info)
    emit(endpoint_row(st), output, COLUMNS)


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
    """List endpoints and whether their Postgres is alive."""
    from neonctl.engine.compute.endpoint import list_endpoints  # noqa: PLC0415

    rows = [endpoint_row(st, s) for st, s in list_endpoints(load_project(project))]
    emit(rows, output, COLUMNS)


def connection_string(branch: BranchArg = "main", project: ProjectOpt = None,
                      output: OutputOpt = Format.table) -> None:
    """Print the connection string of the branch's endpoint; BRANCH@LSN|@TIME starts a read-only time-travel one."""
    st = _endpoint_for(load_project(project), branch)
    if output == Format.table:
        print(st.connection_string)
    else:
        emit({"branch": st.branch, "endpoint": st.name, "read_only": st.at_lsn is not None,
              "connection_string": st.connection_string}, output)


def psql(
    branch: BranchArg = "main",
    args: Annotated[list[str] | None, typer.Argument(help="Extra psql arguments (after --).")] = None,
    project: ProjectOpt = None,
) -> None:
    """Run psql against the branch's endpoint."""
    p = load_project(project)
    st = _endpoint_for(p, branch)
    psql_bin = p.runtime().bin("psql")
    info(f"connecting to {st.connection_string}")
    sys.stdout.flush()
    os.execv(psql_bin, [psql_bin, st.connection_string, *(args or [])])
