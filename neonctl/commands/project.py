"""`neonctl init` and `neonctl project list|delete`."""

from __future__ import annotations

from typing import Annotated

import typer

from neonctl.commands.common import OutputOpt, ProjectOpt
from neonctl.engine.lsn import format_lsn
from neonctl.engine.project import list_projects, load_project
from neonctl.errors import InvalidInput
from neonctl.output import Format, emit, info

app = typer.Typer(help="Manage projects (one Postgres cluster's storage and branches each).", no_args_is_help=True)


def project_row(p) -> dict:
    from neonctl.engine.remote_settings import remote_storage_url  # noqa: PLC0415

    c = p.config
    return {"name": c.name, "id": c.id, "pg_version": c.pg_version, "default_branch": c.default_branch,
            "branches": len(c.branches), "safekeepers": len(c.safekeepers), "pageserver_port": c.pageserver_port,
            "broker_port": c.broker_port, "safekeeper_ports": [s["port"] for s in c.safekeepers],
            "pg_bin": c.pg_bin, "remote_storage": remote_storage_url(p), "proxy_port": c.proxy_port,
            "proxy_http_port": c.proxy_http_port, "proxy_ws_port": c.proxy_ws_port,
            "suspend_timeout": c.suspend_timeout, "pool_size": c.pool_size, "pool_max_mb": c.pool_max_mb,
            "path": str(p.dir)}


def init(
    name: Annotated[str, typer.Option("--name", help="Project name.")] = "default",
    pg_bin: Annotated[
        str | None, typer.Option("--pg-bin", help="PostgreSQL bin directory (>= 15); default: embedded PG 18.")
    ] = None,
    safekeepers: Annotated[int, typer.Option("--safekeepers", help="Number of safekeepers.")] = 1,
    output: OutputOpt = Format.table,
) -> None:
    """Create a project: initdb once, import it into the pageserver as branch `main`."""
    from neonctl.engine.lifecycle import create_project  # noqa: PLC0415 - the pageserver's import path is heavy

    p = create_project(name, pg_bin=pg_bin, safekeepers=safekeepers, progress=info)
    info(f"created project {name!r}; next: `neonctl start`, then `neonctl endpoint start main`")
    emit(project_row(p), output, ["name", "pg_version", "default_branch", "safekeepers", "pageserver_port", "path"])


@app.command("list")
def list_cmd(output: OutputOpt = Format.table) -> None:
    """List projects (a damaged one is listed with its error; the others work normally)."""
    from neonctl.engine.project import broken_projects  # noqa: PLC0415

    rows = [project_row(p) for p in list_projects()]
    rows += [{"name": name, "error": error} for name, error in broken_projects()]
    emit(rows, output, ["name", "pg_version", "branches", "pageserver_port", "path", "error"])


@app.command("get")
def get_cmd(project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """Show one project, with its branches."""
    p = load_project(project)
    row = project_row(p)
    row["branch_list"] = [
        {
            "name": b.name,
            "timeline_id": b.timeline_id,
            "parent": b.parent,
            "parent_lsn": format_lsn(b.parent_lsn) if b.parent_lsn else None,
        }
        for b in p.config.branches.values()
    ]
    emit(row, output, ["name", "id", "pg_version", "default_branch", "branches", "path"])


@app.command("set")
def set_cmd(
    project: ProjectOpt = None,
    safekeepers: Annotated[
        int | None,
        typer.Option("--safekeepers", help="Number of safekeepers (1 is fine for a laptop; 3 tolerates one failure)."),
    ] = None,
    remote_storage: Annotated[
        str | None,
        typer.Option(
            "--remote-storage", help="Where the pageserver offloads timelines: local:PATH or s3://BUCKET/PREFIX."
        ),
    ] = None,
    s3_endpoint_url: Annotated[
        str | None, typer.Option("--s3-endpoint-url", help="S3 endpoint (MinIO, a test server); default: AWS.")
    ] = None,
    s3_region: Annotated[str | None, typer.Option("--s3-region", help="S3 region (default us-east-1).")] = None,
    s3_credentials_file: Annotated[
        str | None,
        typer.Option(
            "--s3-credentials-file",
            help="AWS-style INI file (section default: aws_access_key_id, aws_secret_access_key), mode 0600.",
        ),
    ] = None,
    suspend_timeout: Annotated[
        int | None,
        typer.Option(
            "--suspend-timeout",
            help="Default seconds without a client before the proxy suspends a compute (0 = never). Any time.",
        ),
    ] = None,
    pool_size: Annotated[
        int | None,
        typer.Option("--pool-size", help="Stopped compute directories kept for fast starts (default 2; 0 = none)."),
    ] = None,
    pool_max_mb: Annotated[
        int | None, typer.Option("--pool-max-mb", help="At most this many MiB of kept directories (default 8192).")
    ] = None,
    output: OutputOpt = Format.table,
) -> None:
    """Change a project's settings (the daemons must be stopped for --safekeepers and --remote-storage)."""
    from neonctl.engine.lifecycle import configure_project  # noqa: PLC0415

    p = configure_project(load_project(project), remote_storage=remote_storage, s3_endpoint_url=s3_endpoint_url,
                          s3_region=s3_region, s3_credentials_file=s3_credentials_file, safekeepers=safekeepers,
                          suspend_timeout=suspend_timeout, pool_size=pool_size, pool_max_mb=pool_max_mb,
                          progress=info)
    emit(project_row(p), output, ["name", "safekeepers", "safekeeper_ports", "remote_storage", "suspend_timeout",
                                  "pool_size", "pool_max_mb", "path"])


@app.command("delete")
def delete_cmd(
    name: Annotated[str, typer.Argument(help="Project to delete.")],
    keep_remote: Annotated[
        bool,
        typer.Option("--keep-remote", help="Leave the project's timelines in its remote storage (S3 or a directory)."),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation (scripts).")] = False,
    output: OutputOpt = Format.table,
) -> None:
    """Stop a project's endpoints and daemons and delete all its data, in remote storage too (asks first on a
    terminal; --yes for scripts)."""
    import sys  # noqa: PLC0415

    from neonctl.engine.lifecycle import delete_project, project_to_delete  # noqa: PLC0415 - stops daemons

    p = project_to_delete(name)
    if p is None:  # a delete killed after it moved the project aside: finished now
        emit({"name": name, "deleted": True}, output)
        return
    if not yes and sys.stdin.isatty():
        answer = input(
            f"Delete project {name!r} with {len(p.config.branches)} branch(es) and all its data? "
            "Type its name to confirm: "
        )
        if answer.strip() != name:
            raise InvalidInput("not confirmed: nothing was deleted")
    remote = delete_project(p, keep_remote=keep_remote)
    row = {"name": name, "deleted": True}
    if remote is not None:
        row.update(remote_storage=remote["remote_storage"], remote_timelines_deleted=remote["timelines"])
    emit(row, output)
