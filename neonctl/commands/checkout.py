"""`neonctl checkout [BRANCH]`: the database branch of the current git branch, and a `.neon` context file."""

from __future__ import annotations

from typing import Annotated

import typer

from neonctl.commands.common import OutputOpt, ProjectOpt
from neonctl.output import Format, emit, info


def checkout(
    branch: Annotated[str | None, typer.Argument(help="Branch (default: named after the current git branch).")] = None,
    no_create: Annotated[bool, typer.Option("--no-create", help="Fail instead of creating a missing branch.")] = False,
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Switch to a branch (created from the default one if missing), start it, write .neon at the repo root."""
    from neonctl.engine.checkout import checkout as run  # noqa: PLC0415

    res = run(project, branch, create=not no_create, progress=info)
    if output == Format.table:
        info(f"{'created and ' if res['created'] else ''}checked out branch {res['branch']!r}; "
             f"context in {res['context_file']}")
        print(res["connection_string"])
    else:
        emit(res, output)
