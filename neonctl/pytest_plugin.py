"""pytest plugin: a fresh copy-on-write database branch per test, from a template loaded once.

Installed with neonctl (entry point `pytest11`), nothing to import. The peers clone a template database
per test (pytest-postgresql, ~30 ms but O(size)) or start a container per session (testcontainers); here
a test's database is a branch of the template at its recorded LSN, whatever the template's size, with its
own compute, deleted after the test. A failing test's branch can be kept (`--neonctl-keep-failed`): the
report names it and its connection string, so `neonctl psql BRANCH` opens the exact state at failure.
Every branch gets a TTL, so a killed CI job leaks nothing for long.

Options: `--neonctl-schema PATH|pkg.mod:function` (repeatable; run once on the template, in order),
`--neonctl-project NAME` (an existing project: the template branches from its default branch),
`--neonctl-keep-failed`. Fixtures: `neon_project` (session), `neon_template` (session), `neon_branch`
(function: `.name`, `.dsn`, `.proxy_dsn`, `.lsn`), `neon_conn` (function: a psycopg connection).

pytest-xdist: the workers share one project and one template, created by whichever worker comes first
under a file lock in the run's shared temporary directory; the last worker to finish tears the
throwaway project down. Branch names carry the worker id, so nothing clashes.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import secrets
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

TEST_TTL_SECONDS = 3600
_KEEP_TTL_SECONDS = 7 * 86400


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("neonctl", "neonctl database branches")
    g.addoption("--neonctl-schema", action="append", default=[], metavar="PATH|MODULE:FUNCTION",
                help="SQL file, or a function taking a psycopg connection, run once on the template (repeatable).")
    g.addoption("--neonctl-project", default=None, metavar="NAME",
                help="Use this existing neonctl project (default: a throwaway project in a temporary home).")
    g.addoption("--neonctl-keep-failed", action="store_true", default=False,
                help="Keep a failed test's branch (reported with its connection string; it expires in 7 days).")


@dataclass(frozen=True)
class NeonBranch:
    name: str
    dsn: str  # the compute's own port (SCRAM)
    proxy_dsn: str  # through the project's proxy
    lsn: int
    project: str


@dataclass(frozen=True)
class NeonTemplate:
    branch: str
    lsn: int


def _shared_dir(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory every xdist worker of this run sees (the run's base temp's parent), or our own."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if hasattr(config, "workerinput") else base
    d = root / "neonctl"
    d.mkdir(exist_ok=True)
    return d


@contextmanager
def _locked(path: Path):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _worker(config: pytest.Config) -> str:
    return getattr(config, "workerinput", {}).get("workerid", "main")


@pytest.fixture(scope="session")
def neon_project(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The project the branches live in: `--neonctl-project`, or a throwaway one shared by the workers."""
    from neonctl.engine.lifecycle import create_project, delete_project  # noqa: PLC0415
    from neonctl.engine.project import load_project  # noqa: PLC0415
    from neonctl.engine.storage import start_storage  # noqa: PLC0415
    from neonctl.errors import NeonctlError  # noqa: PLC0415

    config = request.config
    name = config.getoption("--neonctl-project")
    if name:
        try:
            project = load_project(name)
            start_storage(project)
        except NeonctlError as e:
            raise pytest.UsageError(f"--neonctl-project {name}: {e}") from None
        yield project
        return
    shared = _shared_dir(config, tmp_path_factory)
    lock, state_file = shared / "project.lock", shared / "project.json"
    with _locked(lock):
        st = _state(state_file)
        if not st.get("home"):
            home = tempfile.mkdtemp(prefix="neonctl-pytest-")
            os.environ["NEONCTL_HOME"] = home
            create_project("pytest", progress=lambda m: None)
            st = {"home": home, "users": 0}
        os.environ["NEONCTL_HOME"] = st["home"]
        project = load_project("pytest")
        start_storage(project)
        st["users"] = st.get("users", 0) + 1
        state_file.write_text(json.dumps(st))
    try:
        yield project
    finally:
        with _locked(lock):
            st = _state(state_file)
            st["users"] = st.get("users", 1) - 1
            if st["users"] <= 0:
                delete_project(project)
                if st.get("home"):  # the throwaway home this run made goes too
                    shutil.rmtree(st["home"], ignore_errors=True)
                st = {}
            state_file.write_text(json.dumps(st))


def _run_schema(conn, item: str, rootdir: Path) -> None:
    """A `.sql` file (relative to where pytest was started, or absolute), or `pkg.mod:function(conn)`."""
    if ":" in item and not item.endswith(".sql") and not Path(item).exists():
        module, _, fn = item.partition(":")
        getattr(importlib.import_module(module), fn)(conn)
        return
    path = Path(item) if Path(item).is_absolute() else rootdir / item
    conn.execute(path.read_text())


@pytest.fixture(scope="session")
def neon_template(request: pytest.FixtureRequest, neon_project, tmp_path_factory):
    """The branch with the schema loaded, made once per run; its LSN is what every test branches at.
    The last worker to finish deletes it."""
    from neonctl.engine.branches import delete_branch  # noqa: PLC0415
    from neonctl.engine.expiry import set_expiration  # noqa: PLC0415

    shared = _shared_dir(request.config, tmp_path_factory)
    template = _make_template(request.config, neon_project, shared)
    try:
        yield template
    finally:
        _delete_pending(neon_project)
        with _locked(shared / "template.lock"):
            st = _state(shared / "template.json")
            st["users"] = st.get("users", 1) - 1
            if st["users"] <= 0:
                neon_project.reload()
                kept = [b for b in neon_project.config.branches.values() if b.parent == template.branch]
                if kept:  # failed tests' branches were kept: the template goes when they expire
                    set_expiration(neon_project, template.branch, max(b.expires_at or 0 for b in kept) + 60)
                elif template.branch in neon_project.config.branches:
                    delete_branch(neon_project, template.branch, force=True)
                st = {}
            (shared / "template.json").write_text(json.dumps(st))


def _make_template(config: pytest.Config, neon_project, shared: Path) -> NeonTemplate:
    import psycopg  # noqa: PLC0415

    from neonctl.engine.branches import create_branch, delete_branch, image_at_head  # noqa: PLC0415
    from neonctl.engine.compute.endpoint import start_endpoint, stop_endpoint  # noqa: PLC0415
    from neonctl.engine.timepoint import TimePoint  # noqa: PLC0415

    with _locked(shared / "template.lock"):
        st = _state(shared / "template.json")
        if st.get("error"):
            raise pytest.UsageError(st["error"])
        if st.get("branch"):
            neon_project.reload()
            if st["branch"] in neon_project.config.branches:
                st["users"] = st.get("users", 0) + 1
                (shared / "template.json").write_text(json.dumps(st))
                return NeonTemplate(st["branch"], st["lsn"])
        name = f"template-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
        create_branch(neon_project, name, TimePoint(neon_project.config.default_branch),
                      expires_at=time.time() + TEST_TTL_SECONDS)
        item = None
        try:
            ep = start_endpoint(neon_project, name)
            with psycopg.connect(ep.admin_dsn, autocommit=True) as conn:
                for item in config.getoption("--neonctl-schema"):
                    _run_schema(conn, item, config.invocation_params.dir)
                # hint bits and the visibility map set once here, not by every test's first read: a page a
                # test only reads then stays out of what the next test's start rewrites
                conn.execute("VACUUM ANALYZE")
            stop_endpoint(neon_project, name)
            lsn = image_at_head(neon_project, name)
        except Exception as e:  # noqa: BLE001 - the run errors once, with the file and the error; no half-made template stays
            message = f"--neonctl-schema {item}: {type(e).__name__}: {str(e).strip()}"
            (shared / "template.json").write_text(json.dumps({"error": message}))
            try:
                delete_branch(neon_project, name, force=True)
            except Exception:  # noqa: BLE001 - the branch expires anyway
                pass
            raise pytest.UsageError(message) from None
        (shared / "template.json").write_text(json.dumps({"branch": name, "lsn": lsn, "users": 1}))
        return NeonTemplate(name, lsn)


# Per worker: the last test's branch, deleted after the next test's compute started. Its stopped directory
# is rebuilt into the next branch's from the pages its history changed, which needs that history a little
# longer (pageserver/images/rebuild.py).
_PENDING_DELETE: list[str] = []


def _delete_pending(project) -> None:
    from neonctl.engine.branches import delete_branch  # noqa: PLC0415
    from neonctl.errors import NotFound  # noqa: PLC0415

    while _PENDING_DELETE:
        try:
            delete_branch(project, _PENDING_DELETE.pop(), force=True)
        except NotFound:
            pass  # expired meanwhile


@pytest.fixture
def neon_branch(request: pytest.FixtureRequest, neon_project, neon_template) -> NeonBranch:
    """A fresh branch of the template at its LSN with a running read-write compute, deleted after the test."""
    from neonctl.engine.branches import create_branch  # noqa: PLC0415
    from neonctl.engine.compute.endpoint import start_endpoint, stop_endpoint  # noqa: PLC0415
    from neonctl.engine.connection import direct_uri, proxy_uri  # noqa: PLC0415
    from neonctl.engine.expiry import set_expiration  # noqa: PLC0415
    from neonctl.engine.timepoint import TimePoint  # noqa: PLC0415

    name = f"test-{_worker(request.config)}-{secrets.token_hex(4)}"
    b, _ = create_branch(neon_project, name, TimePoint(neon_template.branch, neon_template.lsn),
                         expires_at=time.time() + TEST_TTL_SECONDS)
    st = start_endpoint(neon_project, name, suspend_timeout=0)
    branch = NeonBranch(name, direct_uri(neon_project, st.port), proxy_uri(neon_project, name), b.parent_lsn,
                        neon_project.name)
    request.node.neon_branch = branch
    yield branch
    rep = getattr(request.node, "rep_call", None)
    if request.config.getoption("--neonctl-keep-failed") and rep is not None and rep.failed:
        set_expiration(neon_project, name, time.time() + _KEEP_TTL_SECONDS)
        return
    stop_endpoint(neon_project, name)  # cleanly: the next test's start reuses the directory
    _delete_pending(neon_project)
    _PENDING_DELETE.append(name)


@pytest.fixture
def neon_conn(neon_branch: NeonBranch):
    """A psycopg connection (autocommit) to the test's branch, closed after the test."""
    import psycopg  # noqa: PLC0415

    with psycopg.connect(neon_branch.dsn, autocommit=True) as conn:
        yield conn


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
    branch = getattr(item, "neon_branch", None)
    if branch is not None and rep.when == "call" and rep.failed and item.config.getoption("--neonctl-keep-failed"):
        rep.sections.append(("neonctl branch kept", f"branch {branch.name} of project {branch.project}\n"
                                                    f"connection string: {branch.proxy_dsn}\n"
                                                    f"open it: neonctl psql {branch.name} -p {branch.project}"))
