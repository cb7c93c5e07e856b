"""Damaged state files and unusable homes: one line naming the file and the way out; other projects unharmed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from neonctl.engine.project import projects_dir


def _neonctl(home, *args):
    proc = subprocess.run([sys.executable, "-m", "neonctl", *args], env={**os.environ, "NEONCTL_HOME": str(home)},
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("content", ["", "{", "not json at all", '{"name": "x"}', "[1, 2]"])
def test_damaged_project_json_is_one_line_and_spares_the_others(pg18, cli, content):
    bad = projects_dir() / "broken"
    bad.mkdir(exist_ok=True)
    (bad / "project.json").write_text(content)
    try:
        rc, _, err = cli("branch", "list", "-p", "broken", ok=False)
        assert rc != 0 and err.count("\n") == 1 and "project.json" in err and "not a valid project file" in err
        rc, out, _ = cli("project", "list", "-o", "json")  # the list still works, and says what is wrong
        rows = {r["name"]: r for r in json.loads(out)}
        assert "pg18" in rows and "error" in rows["broken"]
        cli("branch", "list", "-p", pg18.name)  # other projects unaffected
    finally:
        (bad / "project.json").unlink()
        bad.rmdir()


def test_config_without_its_default_branch(pg18, cli):
    bad = projects_dir() / "nodefault"
    bad.mkdir()
    cfg = json.loads((pg18.dir / "project.json").read_text())
    cfg.update(name="nodefault", default_branch="gone")
    (bad / "project.json").write_text(json.dumps(cfg))
    try:
        rc, _, err = cli("branch", "list", "-p", "nodefault", ok=False)
        assert rc != 0 and "default branch 'gone'" in err and err.count("\n") == 1
    finally:
        (bad / "project.json").unlink()
        bad.rmdir()


def test_damaged_endpoint_state_file(pg18, cli):
    f = pg18.dir / "endpoints" / "statebad.json"
    cli("branch", "create", "--name", "statebad", "-p", pg18.name)
    f.parent.mkdir(exist_ok=True)
    f.write_text('{"branch": "statebad", "port":')
    try:
        rc, _, err = cli("endpoint", "start", "statebad", "-p", pg18.name, ok=False)
        assert rc != 0 and err.count("\n") == 1 and str(f) in err and "damaged" in err
    finally:
        f.unlink()
        cli("branch", "delete", "statebad", "-p", pg18.name)


def test_home_that_is_a_file(tmp_path):
    home = tmp_path / "file"
    home.write_text("x")
    rc, _, err = _neonctl(home, "project", "list")
    assert rc != 0 and err.count("\n") == 1 and "is not a directory" in err
    assert home.read_text() == "x"


def test_tui_without_a_terminal_is_one_line(tmp_path):
    rc, _, err = _neonctl(tmp_path / "h", "tui")
    assert rc != 0 and err.count("\n") == 1 and "needs a terminal" in err


def test_project_delete_asks_on_a_terminal(tmp_path):
    """On a pty, `project delete` asks for the name and deletes nothing without it."""
    import pty

    home = tmp_path / "h"
    projects = home / "projects" / "keepme"
    projects.mkdir(parents=True)
    src = json.loads((projects_dir() / "pg18" / "project.json").read_text())
    src["name"] = "keepme"
    (projects / "project.json").write_text(json.dumps(src))
    pid, fd = pty.fork()
    if pid == 0:  # the child: neonctl on a terminal
        os.environ["NEONCTL_HOME"] = str(home)
        os.execv(sys.executable, [sys.executable, "-m", "neonctl", "project", "delete", "keepme"])
    out = b""
    while b"confirm" not in out:
        out += os.read(fd, 1024)
    os.write(fd, b"no\n")
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) != 0 and b"not confirmed" in out
    assert (projects / "project.json").exists()
