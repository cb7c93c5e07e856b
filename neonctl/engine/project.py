"""Projects: one Postgres cluster's storage (pageserver, safekeepers, broker) and its branches.

A project lives in ``<home>/projects/<name>/`` with ``project.json`` (ports,
Postgres version, branches and their timelines), a directory per daemon, and
endpoint state. This module is the model only (reading, saving, locking, the
daemons' addresses); creating and deleting projects is `engine/lifecycle.py`,
which sits above compute and storage.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from neonctl.engine import ports
from neonctl.engine.compute.runtime import PgRuntime, resolve_runtime
from neonctl.engine.context import current_context
from neonctl.engine.credentials import register_project, token_path
from neonctl.engine.durability import fsync_dir
from neonctl.engine.home import compute_root, home_dir, projects_dir
from neonctl.engine.process import BackgroundProcess, pid_cmdline
from neonctl.errors import CorruptData, InvalidInput, NotFound

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
DEFAULT_BRANCH = "main"
PAGESERVER_BASE_PORT = 64000
SAFEKEEPER_BASE_PORT = 5454
BROKER_BASE_PORT = 50051
PROXY_BASE_PORT = 4432  # Neon's proxy port
PROXY_HTTP_BASE_PORT = 4444
PROXY_WS_BASE_PORT = 4450
PENDING_GRACE = 600.0  # seconds after which a pending timeline is a crashed operation's leftover
DEFAULT_SUSPEND_TIMEOUT = 300  # seconds without a client before the proxy suspends a compute (Neon's default)


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidInput(f"invalid {kind} name {name!r}: use letters, digits, '_', '-', '.' (max 63)")
    return name


@dataclass
class Branch:
    name: str
    timeline_id: str
    parent: str | None = None
    parent_lsn: int | None = None
    created_at: float = field(default_factory=time.time)
    suspend_timeout: int | None = None  # None: the project's default
    expires_at: float | None = None  # Unix time after which the branch is deleted (engine/expiry.py)


@dataclass
class ProjectConfig:
    name: str
    id: str
    pg_bin: str | None
    pg_version: int
    system_id: int
    pageserver_port: int
    broker_port: int
    safekeepers: list[dict]
    default_branch: str = DEFAULT_BRANCH
    branches: dict[str, Branch] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    # timeline id -> start time of an operation that made it and has not yet named it in `branches`
    # (branch reset/restore between creating the new timeline and swapping it in): `start`'s reconciliation
    # leaves these alone while recent, and deletes them as crash leftovers after PENDING_GRACE seconds
    pending_timelines: dict[str, float] = field(default_factory=dict)
    # timeline id -> process_token() of the command that recorded it pending: once that process is gone,
    # the timeline is a leftover at once, without waiting for the grace
    pending_owners: dict[str, str] = field(default_factory=dict)
    proxy_port: int | None = None  # None in projects made before the proxy: assigned at the next `start`
    proxy_http_port: int | None = None
    proxy_ws_port: int | None = None  # None in projects made before the WebSocket had its own port: likewise
    suspend_timeout: int = DEFAULT_SUSPEND_TIMEOUT
    # the stopped computes' directories kept for the next starts (compute/dir_pool.py): at most this many,
    # and this many MiB of files
    pool_size: int = 2
    pool_max_mb: int = 8192

    @classmethod
    def from_json(cls, d: dict) -> ProjectConfig:
        d = dict(d)
        d["branches"] = {k: Branch(**v) for k, v in d.get("branches", {}).items()}
        return cls(**d)


class Project:
    def __init__(self, directory: Path):
        self.dir = directory
        path = directory / "project.json"
        try:
            self.config = ProjectConfig.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise NotFound(f"project {directory.name!r} does not exist", hint="run `neonctl init`") from None
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CorruptData(f"{path} is not a valid project file ({type(e).__name__}: {e})",
                              hint="restore it from a backup; other projects are not affected") from None
        if self.config.default_branch not in self.config.branches:
            raise CorruptData(f"{path} names default branch {self.config.default_branch!r}, which it does not have",
                              hint="set default_branch to one of its branches: "
                                   + ", ".join(sorted(self.config.branches)))
        register_project(directory, self.daemon_addresses())

    @property
    def name(self) -> str:
        return self.config.name

    def save(self) -> None:
        tmp = self.dir / "project.json.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(asdict(self.config), indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / "project.json")
        fsync_dir(self.dir)

    @contextmanager
    def lock(self):
        """Serialise state-changing commands on one project (two `endpoint start`s, say)."""
        with open(self.dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def reload(self) -> None:
        self.config = Project(self.dir).config

    def runtime(self) -> PgRuntime:
        return resolve_runtime(self.config.pg_bin)

    def compute_root(self) -> Path:
        return compute_root(self.dir)

    def branch(self, name: str) -> Branch:
        b = self.config.branches.get(name)
        if b is None:  # another process may have created it since we loaded the config
            self.reload()
            b = self.config.branches.get(name)
        if b is None:
            raise NotFound(f"branch {name!r} does not exist in project {self.name!r}",
                           hint=f"branches: {', '.join(sorted(self.config.branches))}")
        return b

    # -- daemons --------------------------------------------------------------

    @property
    def pageserver_addr(self) -> str:
        return f"127.0.0.1:{self.config.pageserver_port}"

    @property
    def proxy_addr(self) -> str:
        return f"127.0.0.1:{self.config.proxy_port}"

    @property
    def proxy_http_addr(self) -> str:
        return f"127.0.0.1:{self.config.proxy_http_port}"

    @property
    def proxy_ws_addr(self) -> str:
        return f"127.0.0.1:{self.config.proxy_ws_port}"

    @property
    def broker_addr(self) -> str:
        return f"127.0.0.1:{self.config.broker_port}"

    def daemon_addresses(self) -> list[str]:
        """Every HTTP address of the project's daemons (where the API credential goes)."""
        out = [self.pageserver_addr, self.broker_addr, *self.safekeeper_addrs().values()]
        return out + ([self.proxy_http_addr] if self.config.proxy_http_port is not None else [])

    def safekeeper_addrs(self) -> dict[int, str]:
        return {sk["id"]: f"127.0.0.1:{sk['port']}" for sk in self.config.safekeepers}

    def safekeeper_dir(self, sk_id: int) -> Path:
        return self.dir / "safekeepers" / f"sk{sk_id}"

    def daemons(self) -> list[BackgroundProcess]:
        """Broker first, then safekeepers, then the pageserver: the order they start in."""
        token = token_path(self.dir)
        register_project(self.dir, self.daemon_addresses())  # ports may have moved since the project was loaded
        out = [BackgroundProcess("broker", "neonctl.engine.broker", ["--listen", self.broker_addr],
                                 self.dir / "broker", f"http://{self.broker_addr}/v1/status", token)]
        peers = ",".join(f"{i}={a}" for i, a in self.safekeeper_addrs().items())
        for sk_id, addr in self.safekeeper_addrs().items():
            out.append(BackgroundProcess(
                f"sk{sk_id}", "neonctl.engine.safekeeper",
                ["--id", str(sk_id), "--workdir", str(self.safekeeper_dir(sk_id)), "--listen", addr,
                 "--broker", self.broker_addr, *(["--peers", peers] if len(self.config.safekeepers) > 1 else [])],
                self.safekeeper_dir(sk_id), f"http://{addr}/v1/status", token))
        out.append(BackgroundProcess(
            "pageserver", "neonctl.engine.pageserver",
            ["--workdir", str(self.dir / "pageserver"), "--listen", self.pageserver_addr,
             "--broker", self.broker_addr, "--safekeepers", ",".join(self.safekeeper_addrs().values()),
             "--pg-bin", self.config.pg_bin or "", "--scratch", str(self.compute_root() / "redo"),
             "--compute-root", str(self.compute_root())],
            self.dir / "pageserver", f"http://{self.pageserver_addr}/v1/status", token))
        if self.config.proxy_port is not None:
            ws = ["--ws", self.proxy_ws_addr] if self.config.proxy_ws_port is not None else []
            out.append(BackgroundProcess(
                "proxy", "neonctl.engine.proxy",
                ["--project-dir", str(self.dir), "--listen", self.proxy_addr, "--http", self.proxy_http_addr, *ws],
                self.dir / "proxy", f"http://{self.proxy_http_addr}/v1/status", token))
        return out

    def assign_proxy_ports(self) -> None:
        """Give a project made before the proxy existed its proxy ports, and one made before the WebSocket
        had a port of its own that port (once, under the project lock)."""
        with self.lock():
            self.reload()
            c = self.config
            if c.proxy_port is None:
                c.proxy_port, c.proxy_http_port, c.proxy_ws_port = allocate_proxy_ports(taken_ports())
                self.save()
            elif c.proxy_ws_port is None:
                c.proxy_ws_port, = ports.allocate(PROXY_WS_BASE_PORT, taken_ports())
                self.save()
        register_project(self.dir, self.daemon_addresses())

    def set_pool_bounds(self, size: int | None, max_mb: int | None) -> None:
        """Bound the pool of stopped directories (the next stop applies it)."""
        with self.lock():
            self.reload()
            if size is not None:
                self.config.pool_size = size
            if max_mb is not None:
                self.config.pool_max_mb = max_mb
            self.save()

    def proxy_without_ws(self) -> bool:
        """The proxy runs, but was started before the project had a WebSocket port (by an older neonctl)."""
        pid = self.daemon("proxy").pid() if self.config.proxy_port is not None else None
        return pid is not None and "--ws" not in pid_cmdline(pid)

    def set_suspend_timeout(self, seconds: int) -> None:
        """The project's default suspend timeout (the proxy reads it on each pass)."""
        with self.lock():
            self.reload()
            self.config.suspend_timeout = seconds
            self.save()

    def daemon(self, name: str) -> BackgroundProcess:
        for d in self.daemons():
            if d.name == name:
                return d
        raise NotFound(f"no daemon named {name!r} in project {self.name!r}")


def taken_ports() -> set[int]:
    """Every daemon port any project of this home has claimed (new ports avoid them)."""
    taken: set[int] = set()
    for p in list_projects():
        c = p.config
        taken |= {c.pageserver_port, c.broker_port, *(sk["port"] for sk in c.safekeepers)}
        taken |= {port for port in (c.proxy_port, c.proxy_http_port, c.proxy_ws_port) if port is not None}
    return taken


def allocate_proxy_ports(taken: set[int]) -> tuple[int, int, int]:
    """The proxy's Postgres, HTTP and WebSocket ports."""
    pg, = ports.allocate(PROXY_BASE_PORT, taken)
    http, = ports.allocate(PROXY_HTTP_BASE_PORT, taken | {pg})
    ws, = ports.allocate(PROXY_WS_BASE_PORT, taken | {pg, http})
    return pg, http, ws


def list_projects() -> list[Project]:
    """The home's projects; one whose project.json is damaged is left out (see `broken_projects`), so it
    never breaks commands on the others."""
    out = []
    for d in sorted(projects_dir().iterdir()):
        if not d.name.startswith(".") and (d / "project.json").exists():
            try:
                out.append(Project(d))
            except CorruptData:
                continue
    return out


def broken_projects() -> list[tuple[str, str]]:
    """(name, error) of every project whose project.json cannot be used."""
    out = []
    for d in sorted(projects_dir().iterdir()):
        if not d.name.startswith(".") and (d / "project.json").exists():
            try:
                Project(d)
            except CorruptData as e:
                out.append((d.name, str(e)))
    return out


def current_marker() -> Path:
    return home_dir() / "current"


def load_project(name: str | None = None) -> Project:
    """The named project, else the nearest `.neon` context's, else the only or last initialised one."""
    if name:
        check_name("project", name)
        return Project(projects_dir() / name)
    ctx = current_context()
    if ctx is not None and ctx.project:
        check_name("project", ctx.project)
        if not (projects_dir() / ctx.project / "project.json").exists():
            raise NotFound(f"project {ctx.project!r} named by {ctx.path} does not exist",
                           hint="fix the file, or pass --project")
        return Project(projects_dir() / ctx.project)
    projects = list_projects()
    if not projects:
        raise NotFound("no project here yet", hint="run `neonctl init` or `neonctl quickstart`")
    if len(projects) == 1:
        return projects[0]
    try:
        cur = current_marker().read_text().strip()
        return Project(projects_dir() / cur)
    except (OSError, NotFound):
        raise InvalidInput("several projects exist; choose one with --project",
                           hint=", ".join(p.name for p in projects)) from None


def default_branch_for(project: Project, branch: str | None) -> str:
    """The branch a command works on: the one given, else the `.neon` context's, else the project's default."""
    if branch:
        return branch
    ctx = current_context()
    if ctx is not None and ctx.branch and (ctx.project in (None, project.name)):
        return ctx.branch
    return project.config.default_branch