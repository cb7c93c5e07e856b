"""Options every command shares: the project selector and the output format."""

from __future__ import annotations

from typing import Annotated

import typer

from neonctl.output import Format

ProjectOpt = Annotated[
    str | None, typer.Option("--project", "-p", help="Project name (default: the only or last initialised one).")
]
OutputOpt = Annotated[Format, typer.Option("--output", "-o", help="Output format: table, json or yaml.")]
