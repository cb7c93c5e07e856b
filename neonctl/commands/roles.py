"""`neonctl roles list|create|delete|reset-password`: the project's login roles, as in Neon's CLI.

Passwords are generated (never typed) and shown with the connection string; running read-write computes
are brought in line at once, stopped ones at their next start.
"""

from __future__ import annotations

from typing import Annotated

import typer

from neonctl.commands.common import OutputOpt, ProjectOpt
from neonctl.engine.project import load_project
from neonctl.output import Format, emit

app = typer.Typer(help="Login roles and their passwords (SCRAM-SHA-256).", no_args_is_help=True)
RoleArg = Annotated[str, typer.Argument(help="Role name.")]
COLUMNS = ["name", "created_at", "computes_updated", "connection_string"]


@app.command("list")
def list_cmd(project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """List roles (passwords appear in -o json|yaml and in `connection-string --role`)."""
    from neonctl.engine.role_admin import role_rows  # noqa: PLC0415

    emit(role_rows(load_project(project)), output, ["name", "created_at"])


@app.command("create")
def create_cmd(name: RoleArg, project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """Create a login role with a generated password."""
    from neonctl.engine.role_admin import create  # noqa: PLC0415

    emit(create(load_project(project), name), output, COLUMNS)


@app.command("reset-password")
def reset_password_cmd(name: RoleArg, project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """Give a role a new generated password; the old one stops working."""
    from neonctl.engine.role_admin import reset  # noqa: PLC0415

    emit(reset(load_project(project), name), output, COLUMNS)


@app.command("delete")
def delete_cmd(name: RoleArg, project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """Delete a role (not `postgres`); running computes drop it at once."""
    from neonctl.engine.role_admin import delete  # noqa: PLC0415

    emit(delete(load_project(project), name), output, ["name", "deleted", "computes_updated"])
