"""`neonctl branch create|list|get|delete|rename|set-default` and `neonctl lsn`."""

from __future__ import annotations

from typing import Annotated

import typer

from neonctl.commands.common import OutputOpt, ProjectOpt
from neonctl.engine import branches as engine
from neonctl.engine import client
from neonctl.engine.compute.endpoint import start_endpoint
from neonctl.engine.lsn import format_lsn, parse_lsn
from neonctl.engine.project import load_project
from neonctl.engine.timepoint import TimePoint, from_pg_us, parse_ref, parse_timestamp, to_pg_us
from neonctl.errors import InvalidInput
from neonctl.output import Format, emit, info

app = typer.Typer(help="Copy-on-write branches: timelines at any LSN or time of their parent.", no_args_is_help=True)

COLUMNS = ["tree", "parent_lsn", "head_lsn", "default", "endpoint", "created_at"]


def _row(project, name: str) -> dict:
    return next(r for r in engine.branch_rows(project) if r["name"] == name)


@app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="Name of the new branch.")],
    parent: Annotated[str | None, typer.Option("--parent", help="Parent: BRANCH, BRANCH@LSN, BRANCH@TIMESTAMP, or an LSN/timestamp of the default branch.")] = None,
    lsn: Annotated[str | None, typer.Option("--lsn", help="Branch point LSN (records ending at or before it).")] = None,
    timestamp: Annotated[str | None, typer.Option("--timestamp", help="Branch point time (transactions committed at or before it).")] = None,
    endpoint: Annotated[bool, typer.Option("--endpoint", help="Start a compute on the new branch right away.")] = False,
    if_not_exists: Annotated[bool, typer.Option("--if-not-exists", help="Return the existing branch instead of failing.")] = False,
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Create a branch. Copies no data: the branch reads its parent's history below the branch point."""
    p = load_project(project)
    ref = parse_ref(parent) if parent else TimePoint(None)
    if lsn is not None and timestamp is not None:
        raise InvalidInput("give --lsn or --timestamp, not both")
    if (lsn is not None or timestamp is not None) and (ref.lsn is not None or ref.timestamp is not None):
        raise InvalidInput("the branch point is given twice (in --parent and in --lsn/--timestamp)")
    point = TimePoint(ref.branch, parse_lsn(lsn) if lsn else ref.lsn,
                      parse_timestamp(timestamp) if timestamp else ref.timestamp)
    b, created = engine.create_branch(p, name, point, if_not_exists=if_not_exists)
    if not created:
        info(f"branch {name!r} already exists; returning it")
    row = _row(p, name)
    if endpoint:
        st = start_endpoint(p, name, progress=info)
        row["endpoint"] = f"running :{st.port}"
        row["connection_string"] = st.connection_string
    emit(row, output, COLUMNS + (["connection_string"] if endpoint else []))


@app.command("list")
def list_cmd(project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """Branches as a tree with branch points, head LSNs and endpoints."""
    emit(engine.branch_rows(load_project(project)), output, COLUMNS)


@app.command("get")
def get_cmd(name: Annotated[str, typer.Argument()], project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """Show one branch."""
    p = load_project(project)
    p.branch(name)
    emit(_row(p, name), output, ["name", "id", "parent", "parent_lsn", "head_lsn", "default", "endpoint"])


@app.command("delete")
def delete_cmd(name: Annotated[str, typer.Argument()],
               force: Annotated[bool, typer.Option("--force", help="Stop a running endpoint first.")] = False,
               project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """Delete a branch (refused for the default branch, branches with children, or a running endpoint)."""
    b = engine.delete_branch(load_project(project), name, force=force)
    emit({"name": b.name, "id": b.timeline_id, "deleted": True}, output)


@app.command("rename")
def rename_cmd(old: Annotated[str, typer.Argument()], new: Annotated[str, typer.Argument()],
               project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """Rename a branch."""
    p = load_project(project)
    engine.rename_branch(p, old, new)
    emit(_row(p, new), output, COLUMNS)


@app.command("set-default")
def set_default_cmd(name: Annotated[str, typer.Argument()], project: ProjectOpt = None,
                    output: OutputOpt = Format.table) -> None:
    """Make a branch the default parent for new branches."""
    p = load_project(project)
    engine.set_default(p, name)
    emit(_row(p, name), output, COLUMNS)


def lsn_cmd(
    branch: Annotated[str, typer.Argument(help="Branch name.")] = "main",
    timestamp: Annotated[str | None, typer.Option("--timestamp", help="Find the LSN for this time.")] = None,
    lsn: Annotated[str | None, typer.Option("--lsn", help="Find the commit time of the last commit at or before this LSN.")] = None,
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Map a commit time to an LSN on a branch, or an LSN to the time of the last commit at or before it."""
    p = load_project(project)
    b = p.branch(branch)
    if (timestamp is None) == (lsn is None):
        raise InvalidInput("give exactly one of --timestamp or --lsn")
    if timestamp is not None:
        ts = parse_timestamp(timestamp)
        res = client.call("pageserver", p.pageserver_addr, "GET",
                          f"/v1/timeline/{b.timeline_id}/lsn_by_timestamp?timestamp_us={to_pg_us(ts)}")
        emit({"branch": branch, "timestamp": ts.isoformat(), "lsn": format_lsn(res["lsn"])}, output)
        return
    want = parse_lsn(lsn)
    commits = client.call("pageserver", p.pageserver_addr, "GET", f"/v1/timeline/{b.timeline_id}/commits")["commits"]
    before = [c for c in commits if c[0] <= want]
    if not before:
        raise InvalidInput(f"no commit at or before {lsn} on branch {branch!r}")
    emit({"branch": branch, "lsn": lsn, "commit_lsn": format_lsn(before[-1][0]),
          "commit_time": from_pg_us(before[-1][1]).isoformat()}, output)
