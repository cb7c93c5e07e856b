"""Every command explains itself, and the committed shell completions are current."""

import os
import subprocess
import sys
from pathlib import Path

import typer

from neonctl.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _is_group(cmd) -> bool:
    return hasattr(cmd, "commands")  # typer's (vendored click) Group; click itself is not a dependency


def _commands(cmd, path=()):
    yield path, cmd
    if _is_group(cmd):
        for name, sub in cmd.commands.items():
            if not sub.hidden:
                yield from _commands(sub, path + (name,))


def test_every_command_has_help_and_output_option():
    root = typer.main.get_command(app)
    for path, cmd in _commands(root):
        assert (cmd.help or "").strip(), f"`neonctl {' '.join(path)}` has no help text"
        if not _is_group(cmd) and path and path[-1] not in ("psql", "tui"):
            opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
            assert "-o" in opts, f"`neonctl {' '.join(path)}` lacks -o/--output"


def test_completions_are_generated_and_current():
    for shell in ("bash", "zsh", "fish"):
        env = {**os.environ, "_NEONCTL_COMPLETE": f"source_{shell}"}
        out = subprocess.run([sys.executable, "-c", "from neonctl.cli import app; app(prog_name='neonctl')"],
                             env=env, capture_output=True, text=True).stdout
        committed = (ROOT / "completions" / f"neonctl.{shell}").read_text()
        assert out == committed, (
            f"completions/neonctl.{shell} is stale: regenerate with _NEONCTL_COMPLETE=source_{shell} neonctl"
        )


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    readme = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    test_cmd = readme[1].split("  #", 1)[0].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv" in test_cmd and test_cmd in ci
    assert ci.index("rm -rf .venv") < ci.index(test_cmd)  # fresh: nothing left from an earlier run
