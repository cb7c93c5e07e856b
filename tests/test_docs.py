"""Every command explains itself, and the committed shell completions are current."""

import os
import subprocess
import sys
from pathlib import Path

import click
import typer

from neonctl.cli import app

ROOT = Path(__file__).resolve().parent.parent


def _commands(cmd: click.Command, path=()):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            if not sub.hidden:
                yield from _commands(sub, path + (name,))


def test_every_command_has_help_and_output_option():
    root = typer.main.get_command(app)
    for path, cmd in _commands(root):
        assert (cmd.help or "").strip(), f"`neonctl {' '.join(path)}` has no help text"
        if not isinstance(cmd, click.Group) and path and path[-1] not in ("psql", "tui"):
            opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
            assert "-o" in opts, f"`neonctl {' '.join(path)}` lacks -o/--output"


def test_completions_are_generated_and_current():
    for shell in ("bash", "zsh", "fish"):
        env = {**os.environ, "_NEONCTL_COMPLETE": f"source_{shell}"}
        out = subprocess.run([sys.executable, "-c", "from neonctl.cli import app; app(prog_name='neonctl')"],
                             env=env, capture_output=True, text=True).stdout
        committed = (ROOT / "completions" / f"neonctl.{shell}").read_text()
        assert out == committed, f"completions/neonctl.{shell} is stale: regenerate with _NEONCTL_COMPLETE=source_{shell} neonctl"
