"""`neonctl tui`: the interactive view (Textual is imported only here, lazily)."""

from __future__ import annotations

from neonctl.commands.common import ProjectOpt
from neonctl.engine.project import load_project
from neonctl.errors import InvalidInput


def tui(project: ProjectOpt = None) -> None:
    """Interactive view of branches, daemons and the layer map (q quits)."""
    import sys  # noqa: PLC0415

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise InvalidInput("neonctl tui needs a terminal", hint="for scripts: `neonctl layers list -o json`")
    p = load_project(project)
    from neonctl.tui.app import run  # noqa: PLC0415 - keep Textual out of every other command

    run(p)
