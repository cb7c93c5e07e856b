"""What `neonctl endpoint start|stop|list` do, as one engine call each: resolve the point (a branch, or
`BRANCH@LSN|@TIME` for a read-only time-travel compute), act, and describe the endpoints as rows."""

from __future__ import annotations

import time
from collections.abc import Callable

from neonctl.engine.compute.endpoint import list_endpoints, read_state, start_endpoint, stop_endpoint
from neonctl.engine.compute.endpoint_state import EndpointState
from neonctl.engine.compute.scale_to_zero import effective_suspend_timeout, suspended_endpoints
from neonctl.engine.compute.time_travel import endpoint_name, resolve_point, start_time_travel
from neonctl.engine.connection import direct_uri
from neonctl.engine.lsn import format_lsn
from neonctl.engine.project import Project
from neonctl.engine.timepoint import parse_ref, parse_ref_with


def endpoint_row(project: Project, st: EndpointState, status: str = "running") -> dict:
    return {
        "endpoint": st.name,
        "branch": st.branch,
        "port": st.port,
        "status": status,
        "mode": "read-write" if st.at_lsn is None else "read-only",
        "start_lsn": format_lsn(st.start_lsn),
        "suspend_timeout": effective_suspend_timeout(project, st),
        "pg_version": st.pg_version,
        "timeline_id": st.timeline_id,
        "connection_string": direct_uri(project, st.port),
        "pgdata": st.pgdata,
        "suspended_at": None,
    }


def start(project: Project, ref: str, *, lsn: str | None = None, timestamp: str | None = None,
          port: int | None = None, fsync: bool = False, suspend_timeout: int | None = None,
          progress: Callable[[str], None] = lambda m: None) -> dict:
    """Start the branch's compute, or a read-only one at a past point; returns its row."""
    point = parse_ref_with(ref, lsn, timestamp)
    if point.lsn is None and point.timestamp is None:
        st = start_endpoint(project, point.branch or project.config.default_branch, port=port, fsync=fsync,
                            progress=progress, suspend_timeout=suspend_timeout)
    else:
        st, _ = start_time_travel(project, point, port=port, progress=progress)
    return endpoint_row(project, st)


def stop(project: Project, ref: str, immediate: bool = False) -> dict:
    """Stop an endpoint named by its branch, `branch@LSN` or `branch@TIME` (found by its record end)."""
    name = ref
    if "@" in ref and read_state(project, ref) is None:  # a time or an unresolved LSN: find its record end
        b, at = resolve_point(project, parse_ref(ref))
        name = endpoint_name(b.name, at)
    st = stop_endpoint(project, name, immediate=immediate)
    return {"endpoint": st.name, "branch": st.branch, "port": st.port, "status": "stopped"}


def endpoint_rows(project: Project) -> list[dict]:
    """Running and crashed endpoints, then the ones the proxy suspended (the next connection wakes them)."""
    rows = [endpoint_row(project, st, s) for st, s in list_endpoints(project)]
    running = {r["endpoint"] for r in rows}
    rows += [
        {
            "endpoint": s["endpoint"],
            "branch": s["branch"],
            "port": None,
            "status": "suspended",
            "mode": "read-write" if "@" not in s["endpoint"] else "read-only",
            "start_lsn": None,
            "suspend_timeout": s["suspend_timeout"],
            "pg_version": None,
            "timeline_id": None,
            "connection_string": None,
            "pgdata": None,
            "suspended_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s["suspended_at"])),
        }
        for s in suspended_endpoints(project)
        if s["endpoint"] not in running
    ]
    return rows
