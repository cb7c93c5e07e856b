"""`neonctl tui`: the layer-map explorer (Textual is imported only here, lazily)."""

from __future__ import annotations

from typing import Annotated

import typer

from neonctl.commands.common import ProjectOpt
from neonctl.engine.project import load_project
from neonctl.errors import InvalidInput


def tui(project: ProjectOpt = None,
        branch: Annotated[str | None, typer.Option("--branch", "-b", help="Branch shown first.")] = None) -> None:
    """Explore the layer map: branches, layers (arrows/click), zoom, SQL console, charts (? lists keys)."""
    import sys

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise InvalidInput("neonctl tui needs a terminal", hint="for scripts: `neonctl layers query SQL`")
    p = load_project(project)
    if branch is not None:
        p.branch(branch)  # an unknown branch is one line, before the screen opens
    from neonctl.tui.app import run  # lazily: keep Textual out of every other command

    run(p, branch)
