"""`neonctl branch create|list|get|delete|rename|set-default|reset|restore|schema-diff` and `neonctl lsn`."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from neonctl.commands.common import OutputOpt, ProjectOpt
from neonctl.engine.project import load_project
from neonctl.errors import InvalidInput
from neonctl.output import Format, emit, info

app = typer.Typer(help="Copy-on-write branches: timelines at any LSN or time of their parent.", no_args_is_help=True)

COLUMNS = ["tree", "parent_lsn", "head_lsn", "default", "endpoint", "created_at", "expires_at"]
ExpiresAtOpt = Annotated[str | None, typer.Option("--expires-at", help="Delete the branch at this time (RFC 3339).")]
TtlOpt = Annotated[str | None, typer.Option("--ttl", help="Delete the branch after this long: 90s, 30m, 2h, 7d.")]


def _row(project, name: str) -> dict:
    from neonctl.engine import branches as engine  # noqa: PLC0415

    return next(r for r in engine.branch_rows(project) if r["name"] == name)


@app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="Name of the new branch.")],
    parent: Annotated[
        str | None,
        typer.Option(
            "--parent", help="Parent: BRANCH, BRANCH@LSN, BRANCH@TIMESTAMP, or an LSN/timestamp of the default branch."
        ),
    ] = None,
    lsn: Annotated[str | None, typer.Option("--lsn", help="Branch point LSN (records ending at or before it).")] = None,
    timestamp: Annotated[
        str | None, typer.Option("--timestamp", help="Branch point time (transactions committed at or before it).")
    ] = None,
    endpoint: Annotated[bool, typer.Option("--endpoint", help="Start a compute on the new branch right away.")] = False,
    if_not_exists: Annotated[
        bool, typer.Option("--if-not-exists", help="Return the existing branch instead of failing.")
    ] = False,
    suspend_timeout: Annotated[
        int | None,
        typer.Option(
            "--suspend-timeout",
            help="Seconds without a client before the proxy suspends its compute "
            "(0 = never; default: the project's, 300).",
        ),
    ] = None,
    expires_at: ExpiresAtOpt = None,
    ttl: TtlOpt = None,
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Create a branch. Copies no data: the branch reads its parent's history below the branch point."""
    from neonctl.engine.branch_ops import create_with_options  # noqa: PLC0415

    row = create_with_options(load_project(project), name, parent, lsn=lsn, timestamp=timestamp,
                              if_not_exists=if_not_exists, suspend_timeout=suspend_timeout, expires_at=expires_at,
                              ttl=ttl, endpoint=endpoint, progress=info)
    emit(row, output, COLUMNS + (["connection_string"] if endpoint else []))


@app.command("list")
def list_cmd(project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """Branches as a tree with branch points, head LSNs and endpoints."""
    from neonctl.engine import branches as engine  # noqa: PLC0415

    emit(engine.branch_rows(load_project(project)), output, COLUMNS)


@app.command("get")
def get_cmd(
    name: Annotated[str, typer.Argument()], project: ProjectOpt = None, output: OutputOpt = Format.table
) -> None:
    """Show one branch (with its expiry, and why an expired branch is still here)."""
    from neonctl.engine.expiry import waiting_reason  # noqa: PLC0415

    p = load_project(project)
    row = {**_row(p, name), "expiry_status": waiting_reason(p, p.branch(name))}
    emit(
        row,
        output,
        ["name", "id", "parent", "parent_lsn", "head_lsn", "default", "endpoint", "expires_at", "expiry_status"],
    )


@app.command("set-expiration")
def set_expiration_cmd(
    name: Annotated[str, typer.Argument()],
    expires_at: ExpiresAtOpt = None,
    ttl: TtlOpt = None,
    never: Annotated[bool, typer.Option("--never", help="Remove the expiry.")] = False,
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Set or clear when a branch is deleted (expired branches go while the project's daemons run)."""
    from neonctl.engine.expiry import parse_expiry, set_expiration  # noqa: PLC0415

    if never == (expires_at is not None or ttl is not None):
        raise InvalidInput("give one of --expires-at, --ttl or --never")
    p = load_project(project)
    set_expiration(p, name, None if never else parse_expiry(expires_at, ttl))
    emit(_row(p, name), output, COLUMNS)


@app.command("delete")
def delete_cmd(
    name: Annotated[str, typer.Argument()],
    force: Annotated[bool, typer.Option("--force", help="Stop a running endpoint first.")] = False,
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Delete a branch (refused for the default branch, branches with children, or a running endpoint)."""
    from neonctl.engine import branches as engine  # noqa: PLC0415

    b = engine.delete_branch(load_project(project), name, force=force)
    emit({"name": b.name, "id": b.timeline_id, "deleted": True}, output)


@app.command("rename")
def rename_cmd(
    old: Annotated[str, typer.Argument()],
    new: Annotated[str, typer.Argument()],
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Rename a branch."""
    from neonctl.engine import branches as engine  # noqa: PLC0415

    p = load_project(project)
    engine.rename_branch(p, old, new)
    emit(_row(p, new), output, COLUMNS)


@app.command("set-default")
def set_default_cmd(
    name: Annotated[str, typer.Argument()], project: ProjectOpt = None, output: OutputOpt = Format.table
) -> None:
    """Make a branch the default parent for new branches."""
    from neonctl.engine import branches as engine  # noqa: PLC0415

    p = load_project(project)
    engine.set_default(p, name)
    emit(_row(p, name), output, COLUMNS)


@app.command("changes")
def changes_cmd(
    name: Annotated[str, typer.Argument(help="Branch name.")],
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Which relations changed on a branch since its branch point, and how many pages (from the layer index)."""
    from neonctl.engine.inspect import branch_changes  # noqa: PLC0415

    res = branch_changes(load_project(project), name)
    if output == Format.table:
        print(f"branch {res['branch']}: changes since {res['since_lsn']} (head {res['head_lsn']})")
        emit(res["relations"], output, ["relation", "fork", "pages_changed"])
    else:
        emit(res, output)


def lsn_cmd(
    branch: Annotated[str, typer.Argument(help="Branch name.")] = "main",
    timestamp: Annotated[str | None, typer.Option("--timestamp", help="Find the LSN for this time.")] = None,
    lsn: Annotated[
        str | None, typer.Option("--lsn", help="Find the commit time of the last commit at or before this LSN.")
    ] = None,
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Map a commit time to an LSN on a branch, or an LSN to the time of the last commit at or before it."""
    from neonctl.engine.branches import lookup_lsn  # noqa: PLC0415

    emit(lookup_lsn(load_project(project), branch, timestamp=timestamp, lsn=lsn), output)


# -- reset / restore / schema-diff (engine: branch_ops.py, schema_diff.py) ------------------------------------

SWAP_COLUMNS = ["name", "id", "parent", "parent_lsn", "endpoint", "restored_from"]
PreserveOpt = Annotated[
    str | None,
    typer.Option("--preserve-under-name", help="Keep the branch's current state as a branch with this name."),
]


def _swap_sections(p, res, first: str, second: str, output: Format) -> dict:
    """Rows of the swapped branch and the branch holding its old state; curated columns in tables."""
    row = {
        **_row(p, res.branch.name),
        "restored_from": res.source,
        "last_reset_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if res.endpoint is not None:
        from neonctl.engine.connection import proxy_uri  # noqa: PLC0415

        row["connection_string"] = proxy_uri(p, res.branch.name)
    out = {first: row}
    if res.preserved is not None:
        out[second] = _row(p, res.preserved.name)
    if output == Format.table:
        out = {k: {c: v[c] for c in SWAP_COLUMNS if c in v} for k, v in out.items()}
    return out


@app.command("reset")
def reset_cmd(
    name: Annotated[str, typer.Argument(help="Branch to reset (it keeps its name and endpoint port).")],
    parent: Annotated[
        bool, typer.Option("--parent", help="Reset to the parent's latest state (the only source).")
    ] = False,
    preserve_under_name: PreserveOpt = None,
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Overwrite a branch with its parent's latest state; a running endpoint restarts on the same port."""
    from neonctl.engine import branch_ops  # noqa: PLC0415

    if not parent:
        raise InvalidInput(
            "only resetting to the parent is supported: pass --parent",
            hint=f"for a point in time use `neonctl branch restore {name} ^self@LSN|TIMESTAMP`",
        )
    p = load_project(project)
    res = branch_ops.reset_branch(p, name, preserve_under_name, progress=info)
    emit(_swap_sections(p, res, "branch", "preserved_branch", output), output)


@app.command("restore")
def restore_cmd(
    name: Annotated[str, typer.Argument(help="Branch to restore (it keeps its name and endpoint port).")],
    source: Annotated[
        str | None, typer.Argument(help="^self@LSN|TIMESTAMP, ^parent[@LSN|TIMESTAMP] or BRANCH[@LSN|TIMESTAMP].")
    ] = None,
    source_opt: Annotated[str | None, typer.Option("--source", help="The source, as an option.")] = None,
    preserve_under_name: Annotated[
        str | None,
        typer.Option("--preserve-under-name", help="Name of the backup branch (default: NAME_old_<head time>)."),
    ] = None,
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Point-in-time restore in place: the branch becomes the source point; its old state stays as a backup branch."""
    from neonctl.engine import branch_ops  # noqa: PLC0415

    if (source is None) == (source_opt is None):
        raise InvalidInput(
            "give the source once: `branch restore NAME SOURCE` or `--source SOURCE`",
            hint="SOURCE is ^self@LSN|TIMESTAMP, ^parent[@...] or BRANCH[@...]",
        )
    p = load_project(project)
    res = branch_ops.restore_branch(p, name, source or source_opt, preserve_under_name, progress=info)
    emit(_swap_sections(p, res, "restored_branch", "backup_branch", output), output)


def schema_diff_cmd(
    base: Annotated[
        str | None, typer.Argument(help="Base: BRANCH[@LSN|@TIMESTAMP] (default: the default branch).")
    ] = None,
    compare: Annotated[
        str | None, typer.Argument(help="Compare: BRANCH[@LSN|@TIMESTAMP], ^parent[@...] (default) or ^self@...")
    ] = None,
    db: Annotated[str | None, typer.Option("--db", "--database", help="Only this database (default: all).")] = None,
    color: Annotated[bool, typer.Option("--color/--no-color", help="Colour the diff.")] = False,
    exit_code: Annotated[bool, typer.Option("--exit-code", help="Exit 1 when the schemas differ (for CI).")] = False,
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Unified diff of the schemas (pg_dump --schema-only) of two points; empty output when identical."""
    from neonctl.engine.schema_diff import colorize, schema_diff  # noqa: PLC0415

    res = schema_diff(load_project(project), base, compare, db, progress=info)
    if output == Format.table:
        sys.stdout.write(colorize(res.text) if color else res.text)
    else:
        emit({"base": res.base, "compare": res.compare, "identical": res.identical, "databases": res.databases}, output)
    if exit_code and not res.identical:
        raise typer.Exit(1)


app.command("schema-diff")(schema_diff_cmd)
app.command("sd", hidden=True)(schema_diff_cmd)
