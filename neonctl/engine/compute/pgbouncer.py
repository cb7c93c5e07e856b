"""PgBouncer beside a compute, for pooled connections (`connection-string --pooled`), as Neon runs it.

Transaction pooling: many client connections share a few server connections. It is the real PgBouncer from
the system's packages, run as the compute's user, listening only on a Unix socket in a 0700 directory
inside the compute's own directory; the proxy authenticates clients and connects there. PgBouncer trusts
that socket (only the compute's user and root can reach it) and connects to Postgres over the compute's
own socket. It lives and dies with its compute: `endpoint stop` and suspension stop it too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from neonctl.engine.process import pid_alive
from neonctl.errors import PostgresError, Timeout

PGBOUNCER_PORT = 6432  # names the socket file (.s.PGSQL.6432); nothing listens on TCP
_CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer")


def pgbouncer_binary() -> str:
    """The system's PgBouncer, or a one-line error naming the package to install."""
    found = shutil.which("pgbouncer") or next((c for c in _CANDIDATES if os.access(c, os.X_OK)), None)
    if not found:
        raise PostgresError("pooled connections need PgBouncer, which is not installed",
                            hint="apt install pgbouncer (Debian/Ubuntu), dnf install pgbouncer, brew install pgbouncer")
    return found


def pooler_dir(epdir: Path) -> Path:
    return epdir / "pgbouncer"


def _pid(epdir: Path) -> int | None:
    try:
        pid = int((pooler_dir(epdir) / "pgbouncer.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def config(epdir: Path, pg_port: int) -> str:
    d = pooler_dir(epdir)
    return "\n".join([
        "[databases]",
        f"* = host={epdir} port={pg_port} application_name=neonctl-pgbouncer",
        "[pgbouncer]",
        "listen_addr =",
        f"listen_port = {PGBOUNCER_PORT}",
        f"unix_socket_dir = {d}",
        "unix_socket_mode = 0600",
        "auth_type = trust",
        f"auth_file = {d / 'userlist.txt'}",
        "pool_mode = transaction",
        "max_client_conn = 1000",
        "default_pool_size = 16",
        "server_idle_timeout = 10",  # idle server connections must not keep the compute from suspending
        "ignore_startup_parameters = extra_float_digits,options",
        f"logfile = {d / 'pgbouncer.log'}",
        f"pidfile = {d / 'pgbouncer.pid'}",
        "",
    ])


def ensure(project, st) -> tuple[str, int]:
    """PgBouncer for the running compute `st` (started if needed); returns (socket directory, port)."""
    from neonctl.engine.roles import load_roles  # noqa: PLC0415 - roles import the SCRAM code; pooling is rare

    binary = pgbouncer_binary()
    epdir = Path(st.pgdata).parent
    d = pooler_dir(epdir)
    if _pid(epdir) is not None:
        return str(d), PGBOUNCER_PORT
    runtime = project.runtime()
    d.mkdir(mode=0o700, exist_ok=True)
    users = sorted(load_roles(project))
    ini = d / "pgbouncer.ini"
    ini.write_text(config(epdir, st.port))
    (d / "userlist.txt").write_text("".join(f'"{u}" ""\n' for u in users))
    for f in (ini, d / "userlist.txt"):
        os.chmod(f, 0o600)
    runtime.chown(d, recursive=True)
    proc = subprocess.run([binary, "-d", str(ini)], capture_output=True, text=True, timeout=30,
                          **runtime.popen_kwargs())
    sock = d / f".s.PGSQL.{PGBOUNCER_PORT}"
    deadline = time.monotonic() + 10
    while not (sock.exists() and _pid(epdir)):
        if time.monotonic() > deadline:
            tail = (d / "pgbouncer.log").read_text(errors="replace").strip().splitlines()[-2:] \
                if (d / "pgbouncer.log").exists() else []
            raise Timeout(f"PgBouncer for {st.name} did not start: {(proc.stderr or '').strip()} {' | '.join(tail)}")
        time.sleep(0.02)
    return str(d), PGBOUNCER_PORT


def stop(epdir: Path) -> bool:
    """Stop the compute's PgBouncer, if one runs; True if it did."""
    pid = _pid(epdir)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + 5
    while pid_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    return True
