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
from neonctl.engine.project import default_branch_for, load_project
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
    from neonctl.engine import endpoint_ops  # noqa: PLC0415

    row = endpoint_ops.start(load_project(project), branch, lsn=lsn, timestamp=timestamp, port=port, fsync=fsync,
                             suspend_timeout=suspend_timeout, progress=info)
    emit(row, output, COLUMNS)


@app.command("stop")
def stop_cmd(
    branch: BranchArg = "main",
    immediate: Annotated[bool, typer.Option("--immediate", help="Immediate shutdown (like a crash).")] = False,
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Stop Postgres and delete its data directory (storage keeps everything)."""
    from neonctl.engine import endpoint_ops  # noqa: PLC0415

    emit(endpoint_ops.stop(load_project(project), branch, immediate=immediate), output)


@app.command("list")
def list_cmd(project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """List endpoints: running, crashed, or suspended by the proxy (the next connection wakes them)."""
    from neonctl.engine.endpoint_ops import endpoint_rows  # noqa: PLC0415

    emit(endpoint_rows(load_project(project)), output, COLUMNS)


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
        res = {"connection_string": res["connection_string"], "neon_config": serverless_config(p, progress=info)}
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
