"""Branch expiry: a branch made with a TTL (`--expires-at`, `--ttl`) is deleted once it is past it.

Neon's answer to leaked CI branches, which its users name as the top problem of branch-per-test and
branch-per-pull-request setups: a killed CI job leaks nothing for long. Expired branches are deleted by
the proxy daemon (`sweep_expired`, about every 10 s) while the project's daemons run, endpoints first.
A branch that has children, or is the default branch, is never deleted by expiry: it waits, and
`branch get` says why.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

from neonctl.engine.branches import delete_branch
from neonctl.engine.project import Branch, Project
from neonctl.errors import InvalidInput, NeonctlError

_TTL_RE = re.compile(r"^(\d+)\s*(s|m|h|d)?$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_expiry(expires_at: str | None, ttl: str | None, now: float | None = None) -> float | None:
    """`--expires-at RFC3339` or `--ttl 90s|30m|2h|7d` -> a Unix time (None: no expiry). Never in the past."""
    if expires_at is not None and ttl is not None:
        raise InvalidInput("give --expires-at or --ttl, not both")
    now = time.time() if now is None else now
    if ttl is not None:
        m = _TTL_RE.match(ttl.strip())
        if not m or int(m.group(1)) <= 0:
            raise InvalidInput(f"invalid --ttl {ttl!r}: a positive duration like 90s, 30m, 2h or 7d")
        return now + int(m.group(1)) * _UNIT[m.group(2)]
    if expires_at is None:
        return None
    try:
        parsed = datetime.fromisoformat(expires_at.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"invalid --expires-at {expires_at!r}: an RFC 3339 timestamp like 2026-12-31T23:00:00Z"
                           ) from None
    if parsed.tzinfo is None:
        raise InvalidInput(f"--expires-at {expires_at} has no time zone: add Z or +HH:MM")
    when = parsed.timestamp()
    if when <= now:
        raise InvalidInput(f"--expires-at {expires_at} is in the past")
    return when


def format_time(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_expiration(project: Project, name: str, expires_at: float | None) -> Branch:
    with project.lock():
        project.reload()
        b = project.branch(name)
        if expires_at is not None and name == project.config.default_branch:
            raise InvalidInput(f"branch {name!r} is the default branch: it cannot expire")
        b.expires_at = expires_at
        project.save()
        return b


def waiting_reason(project: Project, b: Branch, now: float | None = None) -> str | None:
    """Why an expired branch is still here (None if it is not expired, or nothing holds it)."""
    now = time.time() if now is None else now
    if b.expires_at is None or b.expires_at > now:
        return None
    if b.name == project.config.default_branch:
        return "expired, but it is the default branch: never deleted by expiry"
    children = sorted(c.name for c in project.config.branches.values() if c.parent == b.name)
    if children:
        return f"expired, waiting for its child branches to go: {', '.join(children)}"
    return None


def sweep_expired(project: Project, now: float | None = None) -> list[str]:
    """Delete every expired branch that nothing holds, children before parents; returns their names."""
    now = time.time() if now is None else now
    deleted: list[str] = []
    while True:
        project.reload()
        due = [b for b in project.config.branches.values()
               if b.expires_at is not None and b.expires_at <= now and waiting_reason(project, b, now) is None]
        if not due:
            return deleted
        progress = False
        for b in due:
            try:
                delete_branch(project, b.name, force=True)
                deleted.append(b.name)
                progress = True
            except NeonctlError:
                continue  # tried again on the next sweep
        if not progress:
            return deleted
