"""Suspended endpoints: computes the proxy stopped for idleness, remembered until they wake or are stopped.

A suspended endpoint has no Postgres (its data directory went back to the pool, as on `endpoint stop`);
what remains is a small record `endpoints/suspended/<name>.json` so that listings say "suspended" rather
than forgetting it, and the next connection through the proxy starts it again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from neonctl.engine.compute.endpoint_state import EndpointState
from neonctl.engine.project import Project


def _dir(project: Project) -> Path:
    d = project.dir / "endpoints" / "suspended"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _path(project: Project, name: str) -> Path:
    return _dir(project) / f"{name.replace('/', '_')}.json"


def effective_suspend_timeout(project: Project, st: EndpointState) -> int:
    """The endpoint's own timeout, else its branch's, else the project's (0 = never suspend)."""
    if st.suspend_timeout is not None:
        return st.suspend_timeout
    b = project.config.branches.get(st.branch)
    if b is not None and b.suspend_timeout is not None:
        return b.suspend_timeout
    return project.config.suspend_timeout


def mark_suspended(project: Project, st: EndpointState) -> None:
    """Remember a stopped endpoint as suspended (written after its compute stopped)."""
    record = {"endpoint": st.name, "branch": st.branch, "port": st.port, "suspended_at": time.time(),
              "suspend_timeout": effective_suspend_timeout(project, st)}
    tmp = _path(project, st.name).with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, _path(project, st.name))


def suspended_endpoints(project: Project) -> list[dict]:
    out = []
    for f in sorted(_dir(project).glob("*.json")):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    return out


def clear_suspended(project: Project, name: str) -> None:
    _path(project, name).unlink(missing_ok=True)
