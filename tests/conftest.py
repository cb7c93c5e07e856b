"""Shared fixtures: a temporary neonctl home and session-scoped projects with running daemons.

Daemons and Postgres are real processes on loopback; projects are shared per
session so each test pays only for the endpoints it starts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest

from neonctl.cli import main as cli_main
from neonctl.engine.compute.runtime import shared_dir
from neonctl.engine.project import delete_project, load_project

PG15_BIN = "/usr/lib/postgresql/15/bin"

_HOME = tempfile.mkdtemp(prefix="neonctl-test-home-")
os.environ["NEONCTL_HOME"] = _HOME


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def home() -> Path:
    return Path(_HOME)


class Cli:
    """Runs `neonctl` in-process and captures stdout/stderr."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *args: str, ok: bool = True):
        self.capsys.readouterr()
        rc = cli_main([str(a) for a in args])
        out, err = self.capsys.readouterr()
        if ok and rc != 0:
            raise AssertionError(f"neonctl {' '.join(args)} exited {rc}: {err}")
        return rc, out, err


@pytest.fixture
def cli(capsys) -> Cli:
    return Cli(capsys)


def _project(name: str, pg_bin: str | None):
    rc = cli_main(["init", "--name", name, *(["--pg-bin", pg_bin] if pg_bin else []), "-o", "json"])
    assert rc == 0
    assert cli_main(["start", "-p", name, "-o", "json"]) == 0
    project = load_project(name)
    yield project
    delete_project(project)


@pytest.fixture(scope="session")
def pg18():
    yield from _project("pg18", None)


@pytest.fixture(scope="session")
def pg15():
    if not Path(PG15_BIN, "postgres").exists():
        pytest.fail(f"Debian PostgreSQL 15 is required at {PG15_BIN} (apt-get install postgresql-15)")
    yield from _project("pg15", PG15_BIN)


@pytest.fixture(params=["pg18", "pg15"])
def any_project(request):
    return request.getfixturevalue(request.param)


def connect(project, branch: str = "main", **kw) -> psycopg.Connection:
    from neonctl.engine.compute.endpoint import running_endpoint  # noqa: PLC0415

    return psycopg.connect(running_endpoint(project, branch).connection_string, autocommit=True, **kw)


@pytest.fixture(scope="session")
def scratch_dir() -> Path:
    """A directory the unprivileged Postgres user can reach (pytest's tmp_path cannot be, as root)."""
    d = Path(tempfile.mkdtemp(dir=shared_dir("test-scratch")))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)
