"""Start and stop a postmaster directly, as `pg_ctl start -w` / `pg_ctl stop -w` do, without their pauses.

pg_ctl checks on the server ten times a second, so each start and each stop costs up to 100 ms of waiting
for a server that was ready after a few: most of a warm endpoint start, and of each test of the pytest
plugin. Here the readiness that pg_ctl reads - the status line of `postmaster.pid` ("ready" or "standby"),
written by the postmaster itself - is polled every few milliseconds, and a stop is the signal pg_ctl would
send (SIGTERM smart, SIGINT fast, SIGQUIT immediate) followed by the same kind of wait for the process to
exit. The postmaster runs in a session of its own with its output appended to the log, as under pg_ctl.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from neonctl.engine.process import pid_alive
from neonctl.errors import PostgresError, Timeout

STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_PM_STATUS_LINE = 8  # postmaster.pid: pid, datadir, start time, port, socket dir, listen address, shmem, status
# A start is ready after 15-60 ms: polls up to 20 ms apart lost 10 ms on average; a read of the pid file costs µs.
_MAX_PAUSE = 0.002
_children: list[subprocess.Popen] = []  # started here and not yet reaped (a long-lived caller collects them)


def _reap() -> None:
    _children[:] = [c for c in _children if c.poll() is None]


def pid_file_status(pgdata: Path) -> tuple[int, str] | None:
    """(pid, status) from postmaster.pid once the postmaster has written its status line."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().split("\n")
    except OSError:
        return None
    if len(lines) < _PM_STATUS_LINE or not lines[0].strip().isdigit():
        return None
    return int(lines[0]), lines[_PM_STATUS_LINE - 1].strip()


def start(runtime, pgdata: Path, logfile: Path, options: list[str] = (), timeout: float = 120.0) -> int:
    """Start `postgres -D pgdata` and wait until it accepts connections; its pid.

    PostgresError if it exits first (the log says why), Timeout if it is not ready in time (then it is killed).
    """
    _reap()
    with open(logfile, "ab") as log:
        if runtime.run_as is not None:
            runtime.chown(logfile)
        argv, kwargs = runtime.spawn([runtime.bin("postgres"), "-D", str(pgdata), *options])
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, **kwargs)
    _children.append(proc)
    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        code = proc.poll()
        if code is not None:
            raise PostgresError(f"postgres exited with code {code} while starting")
        st = pid_file_status(pgdata)
        if st is not None and st[0] == proc.pid and st[1] in ("ready", "standby"):
            return proc.pid
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise Timeout(f"postgres did not become ready within {timeout:.0f} s")
        time.sleep(pause)
        pause = min(pause * 1.5, _MAX_PAUSE)


def stop(pgdata: Path, mode: str = "fast", timeout: float = 60.0) -> int | None:
    """Stop the postmaster of `pgdata` and wait until it has exited; its pid, or None if none ran.

    Timeout if it is still running after `timeout` seconds (the caller decides whether to SIGKILL)."""
    st = pid_file_status(pgdata)
    if st is None:
        try:
            pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
    else:
        pid = st[0]
    if not pid_alive(pid):
        return None
    try:
        os.kill(pid, STOP_SIGNALS[mode])
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + timeout
    pause = 0.002
    while pid_alive(pid):
        _reap()
        if time.monotonic() > deadline:
            raise Timeout(f"postgres (pid {pid}) did not stop within {timeout:.0f} s ({mode} shutdown)")
        time.sleep(pause)
        pause = min(pause * 1.5, _MAX_PAUSE)
    _reap()
    return pid
