"""`neonctl checkout` and the `.neon` context file, in a real git work tree."""

from __future__ import annotations

import json
import subprocess

import pytest


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
                   check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "app"
    r.mkdir()
    _git(r, "init", "-q", "-b", "main")
    _git(r, "commit", "-q", "--allow-empty", "-m", "init")
    _git(r, "checkout", "-q", "-b", "feature/login")
    (r / "src").mkdir()
    return r


def test_checkout_names_branch_after_git_and_writes_context(pg18, cli, repo, monkeypatch):
    monkeypatch.chdir(repo / "src")
    rc, out, err = cli("checkout", "-p", pg18.name, "-o", "json")
    res = json.loads(out)
    try:
        assert res["branch"] == "feature-login" and res["created"] and res["project"] == pg18.name
        ctx = json.loads((repo / ".neon").read_text())
        assert ctx == {"projectId": pg18.name, "branch": "feature-login"}
        # below the work tree, commands take project and branch from .neon
        rc, out, _ = cli("connection-string")
        assert "endpoint%3Dfeature-login" in out
        rc, out, _ = cli("checkout", "-o", "json")  # again: exists, not created
        assert json.loads(out)["created"] is False
        monkeypatch.chdir(repo.parent)
        other = repo.parent / "ctx.json"
        other.write_text(json.dumps({"projectId": pg18.name, "branch": "main"}))
        rc, out, _ = cli("--context-file", str(other), "connection-string")
        assert "endpoint%3Dmain" in out
    finally:
        monkeypatch.chdir(repo.parent)
        cli("endpoint", "stop", "feature-login", "-p", pg18.name)
        cli("branch", "delete", "feature-login", "-p", pg18.name)


def test_checkout_bad_input(pg18, cli, tmp_path, repo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli("checkout", "-p", pg18.name, ok=False)
    assert rc != 0 and "not inside a git work tree" in err
    monkeypatch.chdir(repo)
    rc, _, err = cli("checkout", "nope-branch", "--no-create", "-p", pg18.name, ok=False)
    assert rc != 0 and "does not exist" in err
    (repo / ".neon").write_text("{not json")
    rc, _, err = cli("connection-string", ok=False)
    assert rc != 0 and ".neon is not valid JSON" in err and err.count("\n") == 1
    (repo / ".neon").write_text(json.dumps({"projectId": "ghost", "branch": "main"}))
    rc, _, err = cli("branch", "list", ok=False)
    assert rc != 0 and "'ghost'" in err and ".neon" in err
