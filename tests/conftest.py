"""Shared fixtures: a temporary neonctl home and session-scoped projects with running daemons.

`tests/unit` holds tests that start no Postgres and no daemon (enforced at collection: they cannot ask for
the project fixtures); `tests/integration` the rest. Daemons and Postgres are real processes on loopback;
projects are shared per session so each test pays only for the endpoints it starts. An integration test
fails when a daemon logged an ERROR or a Traceback while it ran, unless it declares the ones it causes
(`@pytest.mark.daemon_errors("regex", ...)`), as Neon's test runner does. Below the fixtures: the
workloads several modules check against (a recorded history of commits, a writer logging acknowledged
commits, a commit blocked without a quorum).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest

from neonctl.cli import main as cli_main
from neonctl.engine.compute.runtime import shared_dir
from neonctl.engine.lifecycle import delete_project
from neonctl.engine.project import load_project

PG15_BIN = "/usr/lib/postgresql/15/bin"
pytest_plugins = ["walgen"]  # real WAL samples, made once per session (tests/walgen.py)

# Fixtures that start Postgres or daemons: a unit test asking for one is a collection error.
INTEGRATION_FIXTURES = {"pg18", "pg15", "any_project", "wal_sample", "wal_pg18", "wal_pg15", "scratch_dir"}

_HOME = tempfile.mkdtemp(prefix="neonctl-test-home-")
os.environ["NEONCTL_HOME"] = _HOME
# Every incremental rebuild of a stopped compute's directory in the tests is checked against a full restore
# of the same image, byte by byte (pageserver/images/rebuild.py); a difference fails the endpoint start.
os.environ["NEONCTL_VERIFY_REBUILD"] = "1"
# The daemons the tests start offer the test-only fault point API (PUT /v1/failpoints, engine/failpoints.py).
os.environ["NEONCTL_TESTING"] = "1"


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("NEONCTL_KEEP_TEST_HOME"):
        print("kept", _HOME)
        return
    shutil.rmtree(_HOME, ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "daemon_errors(*patterns): daemon log ERROR/Traceback lines this test causes")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "unit" in item.path.parts and INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            used = sorted(INTEGRATION_FIXTURES & set(item.fixturenames))
            raise pytest.UsageError(f"{item.nodeid} is a unit test but uses {used}: move it to tests/integration")


def _daemon_logs() -> list[Path]:
    """The neonctl daemons' logs (pageserver, safekeepers, broker, proxy), not the computes' Postgres logs."""
    home = Path(_HOME)
    return [*home.glob("projects/*/pageserver/*.log"), *home.glob("projects/*/broker/*.log"),
            *home.glob("projects/*/proxy/*.log"), *home.glob("projects/*/safekeepers/*/*.log")]


@pytest.fixture(autouse=True)
def _no_unexpected_daemon_errors(request):
    """Fail an integration test when a daemon logged an ERROR or a Traceback while it ran."""
    if "integration" not in request.node.path.parts:
        yield
        return
    sizes = {p: p.stat().st_size for p in _daemon_logs()}
    yield
    marker = request.node.get_closest_marker("daemon_errors")
    allowed = [re.compile(x) for x in (marker.args if marker else ())]
    bad = []
    for log in _daemon_logs():
        try:
            with open(log, "rb") as f:
                f.seek(sizes.get(log, 0))
                text = f.read().decode(errors="replace")
        except OSError:
            continue
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if (" ERROR " in line or line.startswith("Traceback")) and not any(a.search(line) for a in allowed):
                bad.append(f"{log.relative_to(_HOME)}: {line[:300]}")
                if line.startswith("Traceback"):  # and what was raised: the traceback's last line
                    end = next((j for j in range(i + 1, len(lines)) if not lines[j].startswith((" ", "\t"))), None)
                    if end is not None:
                        bad.append(f"{log.relative_to(_HOME)}:   -> {lines[end][:300]}")
    if bad:
        pytest.fail("daemon logs show unexpected errors during the test (declare expected ones with "
                    "@pytest.mark.daemon_errors):\n" + "\n".join(bad[:20]), pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure, add the daemons' recent problems to the report: the logs go with the test home."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        lines = []
        for log in sorted(Path(_HOME).glob("projects/*/*/*.log")) + sorted(Path(_HOME).glob("projects/*/*/*/*.log")):
            try:
                text = log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            bad = [ln for i, ln in enumerate(text)
                   if any(w in ln for w in (" ERROR ", "Traceback", " WARNING ", "FATAL", "PANIC"))
                   or (i and text[i - 1].startswith(" ") and not ln.startswith((" ", "\t", "Traceback")))]
            lines += [f"{log.relative_to(_HOME)}: {ln[:300]}" for ln in bad[-8:]]
        if lines:
            report.sections.append(("daemon log problems", "\n".join(lines[-60:])))


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
            raise AssertionError(f"neonctl {' '.join(map(str, args))} exited {rc}: {err}")
        return rc, out, err


@pytest.fixture
def cli(capsys) -> Cli:
    return Cli(capsys)


def _project(name: str, pg_bin: str | None):
    rc = cli_main(["init", "--name", name, *(["--pg-bin", pg_bin] if pg_bin else []), "-o", "json"])
    assert rc == 0
    # Shared projects never scale to zero: a module's endpoint must not vanish while it sits idle between
    # tests. The proxy tests give their own branches short suspend timeouts.
    assert cli_main(["project", "set", "-p", name, "--suspend-timeout", "0", "-o", "json"]) == 0
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

    return psycopg.connect(running_endpoint(project, branch).admin_dsn, autocommit=True, **kw)


def image_of_running_branch(project, branch: str) -> dict:
    """CHECKPOINT on the branch's running compute, then an image at its head once the pageserver has the WAL:
    the compute keeps running from before the image (what the rebuild's hint-bit rule looks at)."""
    from waiting import wait_until  # noqa: PLC0415

    from neonctl.engine.pageserver.client import PageserverClient  # noqa: PLC0415
    from neonctl.engine.safekeeper.client import flush_lsn  # noqa: PLC0415

    tl = project.branch(branch).timeline_id
    with connect(project, branch) as conn:
        conn.execute("CHECKPOINT")
    flush = flush_lsn(project, tl)
    ps = PageserverClient.of(project)
    wait_until(lambda: ps.timeline(tl)["last_record_lsn"] >= flush, 30, "the pageserver to ingest the load")
    return ps.create_image(tl, timeout=300)


def start_how(cli, project, branch: str) -> str:
    """Start the branch's compute; how its directory was made: 'reused' (the stopped one as it was),
    'rebuilt' (the stopped one, changed pages rewritten) or 'full' (restored from the image)."""
    _, _, err = cli("endpoint", "start", branch, "-p", project.name)
    if "reused (no restore, no replay)" in err:
        return "reused"
    return "rebuilt" if "rebuilt from the stopped compute's directory" in err else "full"


def materialise_next_start(project) -> None:
    """Make the project's next endpoint start build its directory from storage (image + WAL replay) instead of
    reusing or rebuilding a stopped one: forget the records that say which history each kept one has."""
    from neonctl.engine.compute import dir_pool  # noqa: PLC0415
    from neonctl.engine.compute.endpoint import directory_pool  # noqa: PLC0415

    dir_pool.forget_all(directory_pool(project))


@contextmanager
def pool_size(cli, project, size: int):
    """The project's pool of kept directories bounded to `size` for a block (a test that needs each start
    rebuilt from one known directory), back to the default of 2 afterwards."""
    cli("project", "set", "--pool-size", str(size), "-p", project.name)
    try:
        yield
    finally:
        cli("project", "set", "--pool-size", "2", "-p", project.name)


@contextmanager
def running_main(project):
    """main's endpoint running for a module's fixture; afterwards every endpoint of the project is stopped,
    so the session-wide project is left without computes for the next module."""
    from neonctl.engine.compute.endpoint import list_endpoints  # noqa: PLC0415

    assert cli_main(["endpoint", "start", "main", "-p", project.name, "-o", "json"]) == 0
    try:
        yield
    finally:
        for st, _ in list_endpoints(project):
            assert cli_main(["endpoint", "stop", st.name, "-p", project.name, "-o", "json"]) == 0


def new_table(conn, table: str, columns: str) -> None:
    """A module's own table, empty even if an earlier module of the session-wide project left one behind."""
    conn.execute(f"DROP TABLE IF EXISTS {table}")
    conn.execute(f"CREATE TABLE {table} ({columns})")


def insert_lsn(conn) -> int:
    """Where the compute writes its next WAL record: the LSN that names "everything committed so far"."""
    return int(conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()[0])


def commit_history(conn, table: str, batches: int, ids, after_batch=lambda conn, i: None) -> list[tuple]:
    """Commit batches i = 1..batches of rows (id, i) with ids `ids(i)` = (first, last) into a new `table`, one
    transaction each (`after_batch` may add another before the point is taken); returns (insert LSN, wall time,
    row count) after each: the oracle that points in the branch's history are checked against."""
    new_table(conn, table, "id int PRIMARY KEY, batch int")
    points = []
    for i in range(1, batches + 1):
        time.sleep(0.05)
        first, last = ids(i)
        conn.execute(f"INSERT INTO {table} SELECT g, %s FROM generate_series(%s::int, %s::int) g", (i, first, last))
        after_batch(conn, i)
        lsn = insert_lsn(conn)
        rows = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        points.append((lsn, datetime.now(timezone.utc), rows))
        time.sleep(0.05)
    return points


class Writer:
    """Inserts rows one commit at a time; `acked` holds the ids whose COMMIT returned cleanly.

    A commit that returned with a warning (a cancelled wait for the synchronous standbys) is not acknowledged:
    the safekeepers may not have it.
    """

    def __init__(self, project, table: str, start: int = 1):
        self.project, self.table = project, table
        self.acked: list[int] = []
        self.warned: list[int] = []
        self.stop = threading.Event()
        self.error: Exception | None = None
        self.next = start
        with connect(project) as conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (id int PRIMARY KEY, pad text)")
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        try:
            with connect(self.project) as conn:
                notices: list = []
                conn.add_notice_handler(lambda d: notices.append(d))
                while not self.stop.is_set():
                    i = self.next
                    self.next += 1
                    notices.clear()
                    conn.execute(f"INSERT INTO {self.table} VALUES (%s, repeat('x', 100))", (i,))
                    (self.warned if notices else self.acked).append(i)
        except psycopg.Error as e:
            self.error = e

    def finish(self, timeout: float = 30):
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the writer is stuck"
        return self.acked


def assert_all_present(project, table: str, acked: list[int]):
    with connect(project) as conn:
        present = {r[0] for r in conn.execute(f"SELECT id FROM {table}")}
    missing = set(acked) - present
    assert not missing, f"{len(missing)} acknowledged commits lost, e.g. {sorted(missing)[:5]}"


class BlockedCommit:
    """`INSERT INTO table VALUES (42)` committed from a thread while too few safekeepers run: it must wait in
    SyncRep, and return once enough of them are back (the table is created while they all still run)."""

    def __init__(self, project, table: str):
        self.project, self.table = project, table
        self.done = threading.Event()
        self.errors: list[Exception] = []
        with connect(project) as conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (id int)")
        self.thread = threading.Thread(target=self._commit, daemon=True)

    def _commit(self):
        try:
            with connect(self.project) as conn:
                conn.execute(f"INSERT INTO {self.table} VALUES (42)")
            self.done.set()
        except Exception as e:  # noqa: BLE001
            self.errors.append(e)

    def start(self) -> BlockedCommit:
        self.thread.start()
        return self

    def assert_waiting(self, why: str) -> None:
        assert not self.done.wait(3.0), why
        with connect(self.project) as conn:
            assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'").fetchone()[0] == 1

    def assert_committed(self, why: str, within: float = 15) -> None:
        assert self.done.wait(within), f"{why} (within {within} s): {self.errors}"
        self.thread.join()

    def assert_kept(self) -> None:
        with connect(self.project) as conn:
            assert conn.execute(f"SELECT count(*) FROM {self.table} WHERE id = 42").fetchone()[0] == 1


@pytest.fixture(scope="session")
def scratch_dir() -> Path:
    """A directory the unprivileged Postgres user can reach (pytest's tmp_path cannot be, as root)."""
    d = Path(tempfile.mkdtemp(dir=shared_dir("test-scratch")))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)
