"""`neonctl gc`: garbage-collect history outside the PITR window."""

from __future__ import annotations

from typing import Annotated

import typer

from neonctl.commands.common import OutputOpt, ProjectOpt
from neonctl.engine.project import load_project
from neonctl.output import Format, emit


def gc(
    branch: Annotated[str | None, typer.Option("--branch", "-b", help="Only this branch.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would be removed; remove nothing.")] = False,
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Remove images, deltas and WAL no branch point, time-travel endpoint or the PITR window needs."""
    from neonctl.engine.retention import run_gc  # noqa: PLC0415

    rows = run_gc(load_project(project), branch, dry_run)
    if output == Format.table:
        for r in rows:
            for k in ("images_removed", "deltas_removed", "wal_segments_removed"):
                r[k] = len(r[k])
    emit(
        rows,
        output,
        [
            "branch",
            "cutoff",
            "space_cutoff",
            "time_cutoff",
            "images_removed",
            "deltas_removed",
            "wal_segments_removed",
            "bytes_freed",
            "dry_run",
        ],
    )
