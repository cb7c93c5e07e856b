"""The pytest plugin on a sample project, run as a user runs it: a separate pytest, with pytest-xdist.

The sample (tests/plugin_sample) loads a SQL file and a `module:function` on the template; its tests
write conflicting rows, and each must see only the template's data. Afterwards no test branch is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from neonctl.cli import main as cli_main

SAMPLE = Path(__file__).resolve().parents[1] / "plugin_sample"


def _pytest(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=SAMPLE,
                          env={**os.environ, "PYTHONPATH": str(SAMPLE), **(env or {})}, capture_output=True,
                          text=True, timeout=600)


def _branches(project: str, capsys) -> list[dict]:
    capsys.readouterr()
    assert cli_main(["branch", "list", "-o", "json", "-p", project]) == 0
    return json.loads(capsys.readouterr().out)


def test_sample_project_with_xdist_in_a_throwaway_project(tmp_path):
    home = tmp_path / "home"
    before = set(Path(tempfile_root()).glob("neonctl-pytest-*"))
    proc = _pytest("-n", "2", "sample_tests.py", "--neonctl-schema", "schema.sql", "--neonctl-schema",
                   "seed:add_audit", env={"NEONCTL_HOME": str(home)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 passed" in proc.stdout
    # the throwaway project, and the home made for it, went with the session
    assert not list(Path(tempfile_root()).glob("neonctl-pytest-*/projects/pytest/project.json"))
    assert set(Path(tempfile_root()).glob("neonctl-pytest-*")) <= before


def tempfile_root() -> str:
    import tempfile

    return tempfile.gettempdir()


def test_existing_project_keeps_nothing_but_a_failed_branch(pg18, capsys):
    before = {b["name"] for b in _branches(pg18.name, capsys)}
    proc = _pytest("-n", "2", "sample_tests.py", "failing_tests.py", "--neonctl-project", pg18.name,
                   "--neonctl-schema", "schema.sql", "--neonctl-schema", "seed:add_audit", "--neonctl-keep-failed")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "5 passed" in proc.stdout and "1 failed" in proc.stdout
    assert "neonctl branch kept" in proc.stdout and "connection string: postgresql://" in proc.stdout
    after = {b["name"]: b for b in _branches(pg18.name, capsys)}
    kept = set(after) - before
    # the failed test's branch and the template under it, nothing else; both expire
    (name,) = [k for k in kept if k.startswith("test-")]
    (template,) = [k for k in kept if k.startswith("template-")]
    assert kept == {name, template} and after[name]["parent"] == template
    assert after[name]["expires_at"] is not None and after[template]["expires_at"] >= after[name]["expires_at"]
    assert cli_main(["branch", "delete", name, "--force", "-p", pg18.name, "-o", "json"]) == 0
    assert cli_main(["branch", "delete", template, "--force", "-p", pg18.name, "-o", "json"]) == 0


def test_bad_schema_and_unknown_project_error_once(tmp_path, pg18):
    bad = tmp_path / "bad.sql"
    bad.write_text("CREATE TABLE broken (;")
    proc = _pytest("-n", "2", "sample_tests.py", "--neonctl-project", pg18.name, "--neonctl-schema", str(bad))
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert str(bad) in out and "syntax error" in out
    proc = _pytest("sample_tests.py", "--neonctl-project", "no-such-project")
    assert proc.returncode != 0 and "no-such-project" in proc.stdout + proc.stderr
