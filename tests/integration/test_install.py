"""The install a new user gets: every run-time import is a declared dependency, and the CLI starts light.

`test_fresh_venv_install` builds neonctl's wheel and installs it into an empty virtual environment (no
system site-packages), so an import the project never declared fails here instead of hiding behind the
machine's packages. The start-up tests look at `sys.modules` of a real CLI process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Loaded only by the daemons and by the commands that need them (layers, wal, page, tui, quickstart).
HEAVY = ("numba", "numpy", "duckdb", "aiohttp", "textual", "boto3", "botocore", "psycopg", "zstandard", "rich",
         "yaml", "llvmlite")
_PROBE = ("import json, runpy, sys\n"
          "sys.argv = ['neonctl', *json.loads(sys.argv[1])]\n"
          "try:\n"
          "    runpy.run_module('neonctl', run_name='__main__')\n"
          "except SystemExit:\n"
          "    pass\n"
          "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)\n")


def _modules_after(*args: str, env: dict | None = None) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(list(args))], capture_output=True, text=True,
                          env=env, timeout=60)
    return set(json.loads(proc.stderr.strip().splitlines()[-1]))


def test_help_and_version_import_no_heavy_module():
    for args in (["--help"], ["--version"], ["branch", "--help"], ["endpoint", "start", "--help"]):
        heavy = _modules_after(*args) & set(HEAVY)
        assert not heavy, f"`neonctl {' '.join(args)}` imported {sorted(heavy)}"


def test_light_commands_import_no_heavy_module(tmp_path):
    import os

    env = {**os.environ, "NEONCTL_HOME": str(tmp_path)}
    heavy = _modules_after("branch", "list", env=env) & set(HEAVY)  # fails (no project) after parsing: still light
    assert not heavy, f"`neonctl branch list` imported {sorted(heavy)}"


def test_fresh_venv_install(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, timeout=300)
    (wheel,) = wheels.glob("neonctl-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    py = env_dir / "bin" / "python"
    # Dependencies come from the package index (pip's cache makes this quick after .ci/run's own install).
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)], check=True,
                   timeout=900)
    for cmd in ([str(env_dir / "bin" / "neonctl"), "--version"], [str(env_dir / "bin" / "neonctl"), "--help"],
                [str(py), "-m", "neonctl", "--help"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    assert "neonctl 0." in subprocess.run([str(env_dir / "bin" / "neonctl"), "--version"], capture_output=True,
                                          text=True, cwd=tmp_path).stdout
    # The installed package, not this checkout, answered; and it declares what it imports at run time.
    where = subprocess.run([str(py), "-c", "import neonctl, numba, duckdb, psycopg, textual, aiohttp, boto3; "
                            "print(neonctl.__file__)"], capture_output=True, text=True, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert str(env_dir) in where.stdout
