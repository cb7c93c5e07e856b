"""Background processes: the one place that owns pid files, log files, readiness and shutdown.

Every storage daemon (pageserver, safekeepers, broker) is a detached Python
process with a pid file and a log file; start waits for a health check with a
deadline, stop sends SIGTERM then SIGKILL. A pid file whose process is gone (or
is some other program now) is stale and is cleaned up, so starting twice is
harmless and a crashed daemon is reported as such.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from neonctl.engine.client import request
from neonctl.errors import DaemonError


def hold_daemon_lock() -> None:
    """In a daemon: take the lock neonctl named (NEONCTL_DAEMON_LOCK) for the process's life, pid inside.
    A second daemon for the same slot exits here instead of fighting over the port."""
    path = os.environ.get("NEONCTL_DAEMON_LOCK")
    if not path:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"fatal: another daemon holds {path}", flush=True)
        raise SystemExit(1) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    os.set_inheritable(fd, False)
    _HELD.append(fd)  # kept open (and locked) until the process exits


_HELD: list[int] = []


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def process_token(pid: int | None = None) -> str:
    """"PID:START": a process's identity that a later process reusing the PID does not share (the start
    time in clock ticks since boot, from /proc)."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "?"
    return f"{pid}:{start}"


def token_alive(token: str) -> bool:
    """Whether the process `process_token` named is still running."""
    pid, _, _ = token.partition(":")
    return pid.isdigit() and pid_alive(int(pid)) and process_token(int(pid)) == token


def pid_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def http_ok(url: str, timeout: float = 1.0, pid: int | None = None) -> bool:
    """The health URL answers 200 - from process `pid`, if given (not some other home's daemon)."""
    address, _, path = url.removeprefix("http://").partition("/")
    try:
        r = request(address, "GET", "/" + path, timeout=timeout)
    except (OSError, ValueError):
        return False
    return r.status == 200 and (pid is None or r.headers.get("X-Neonctl-Pid") == str(pid))


def log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


@dataclass
class BackgroundProcess:
    """A daemon identified by name, launched as ``python -m <module> <args>``."""

    name: str
    module: str
    args: list[str]
    workdir: Path
    health_url: str
    token_file: Path | None = None  # the project's API credential, handed to the daemon (credentials.py)

    @property
    def pid_file(self) -> Path:
        return self.workdir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def lock_file(self) -> Path:
        """Held (flock) by the daemon for its whole life, with its pid inside: found even without a pid file."""
        return self.workdir / f"{self.name}.lock"

    def pid(self) -> int | None:
        """The live pid, or None. The pid file is a hint: a daemon whose pid file was lost or garbled is found
        through its lock; a stale pid file is removed."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid is not None and pid_alive(pid) and self.module in pid_cmdline(pid):
            return pid
        holder = self._lock_holder()
        if holder is not None:
            self.pid_file.write_text(f"{holder}\n")  # repair the hint
            return holder
        self.pid_file.unlink(missing_ok=True)
        return None

    def _lock_holder(self) -> int | None:
        try:
            fd = os.open(self.lock_file, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: a daemon lives
                try:
                    pid = int(os.pread(fd, 32, 0).decode().strip())
                except ValueError:
                    return None
                return pid if pid_alive(pid) and self.module in pid_cmdline(pid) else None
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def state(self) -> str:
        pid = self.pid()
        if pid is None:
            return "stopped"
        return "running" if http_ok(self.health_url, pid=pid) else "unhealthy"

    def start(self, timeout: float = 15.0) -> int:
        existing = self.pid()
        if existing is not None:
            return existing
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["NEONCTL_DAEMON_LOCK"] = str(self.lock_file)
        if self.token_file is not None:
            env["NEONCTL_API_TOKEN_FILE"] = str(self.token_file)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True, env=env,
            )
        env.pop("NEONCTL_DAEMON_LOCK", None)
        self.pid_file.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise DaemonError(
                    f"{self.name} exited during start (code {proc.returncode}): {log_tail(self.log_file, 1)}",
                    hint=f"see {self.log_file}",
                )
            if http_ok(self.health_url, timeout=0.5, pid=proc.pid):
                return proc.pid
            time.sleep(0.05)
        self.stop(immediate=True)
        raise DaemonError(f"{self.name} did not become healthy within {timeout:.0f}s", hint=f"see {self.log_file}")

    def stop(self, immediate: bool = False, timeout: float = 10.0) -> bool:
        """Stop the daemon; True if it was running."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL if immediate else signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
            time.sleep(0.02)
        self.pid_file.unlink(missing_ok=True)
        return True
