"""`neonctl endpoint start|stop|list`, `connection-string` and `psql`."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from neonctl.commands.common import OutputOpt, ProjectOpt
from neonctl.engine.compute.endpoint import (
    list_endpoints, running_endpoint, start_endpoint, stop_endpoint)
from neonctl.engine.lsn import format_lsn
from neonctl.engine.project import load_project
from neonctl.output import Format, emit, info

app = typer.Typer(help="Postgres computes on branches.", no_args_is_help=True)

BranchArg = Annotated[str, typer.Argument(help="Branch name.")]


def endpoint_row(st, status: str = "running") -> dict:
    return {"branch": st.branch, "port": st.port, "status": status, "start_lsn": format_lsn(st.start_lsn),
            "pg_version": st.pg_version, "timeline_id": st.timeline_id, "connection_string": st.connection_string,
            "pgdata": st.pgdata}


@app.command("start")
def start_cmd(
    branch: BranchArg = "main",
    port: Annotated[int | None, typer.Option("--port", help="Port (default: first free from 55432).")] = None,
    fsync: Annotated[bool, typer.Option("--fsync/--no-fsync", help="fsync in the compute (its data dir is a disposable cache).")] = False,
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Materialise the branch from storage and start Postgres on it."""
    st = start_endpoint(load_project(project), branch, port=port, fsync=fsync, progress=info)
    emit(endpoint_row(st), output, ["branch", "port", "status", "start_lsn", "connection_string"])


@app.command("stop")
def stop_cmd(
    branch: BranchArg = "main",
    immediate: Annotated[bool, typer.Option("--immediate", help="Immediate shutdown (like a crash).")] = False,
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Stop Postgres and delete its data directory (storage keeps everything)."""
    st = stop_endpoint(load_project(project), branch, immediate=immediate)
    emit({"branch": st.branch, "port": st.port, "status": "stopped"}, output)


@app.command("list")
def list_cmd(project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """List endpoints and whether their Postgres is alive."""
    rows = [endpoint_row(st, s) for st, s in list_endpoints(load_project(project))]
    emit(rows, output, ["branch", "port", "status", "start_lsn", "connection_string"])


def connection_string(branch: BranchArg = "main", project: ProjectOpt = None,
                      output: OutputOpt = Format.table) -> None:
    """Print the connection string of the branch's running endpoint."""
    st = running_endpoint(load_project(project), branch)
    if output == Format.table:
        print(st.connection_string)
    else:
        emit({"branch": branch, "connection_string": st.connection_string}, output)


def psql(
    branch: BranchArg = "main",
    args: Annotated[list[str] | None, typer.Argument(help="Extra psql arguments (after --).")] = None,
    project: ProjectOpt = None,
) -> None:
    """Run psql against the branch's endpoint."""
    p = load_project(project)
    st = running_endpoint(p, branch)
    psql_bin = p.runtime().bin("psql")
    info(f"connecting to {st.connection_string}")
    sys.stdout.flush()
    os.execv(psql_bin, [psql_bin, st.connection_string, *(args or [])])
