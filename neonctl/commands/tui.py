"""`neonctl tui`: the interactive view (Textual is imported only here, lazily)."""

from __future__ import annotations

from neonctl.commands.common import ProjectOpt
from neonctl.engine.project import load_project


def tui(project: ProjectOpt = None) -> None:
    """Interactive view of branches, daemons and the layer map (q quits)."""
    p = load_project(project)
    from neonctl.tui.app import run  # noqa: PLC0415 - keep Textual out of every other command

    run(p)
