"""Scale to zero: stop computes that had no client for their suspend timeout; the next connection wakes them.

Neon suspends a compute after 300 s without activity. "No client" here means no session through the proxy
and no client backend in the compute's own `pg_stat_activity` (so `--direct` clients keep it awake too;
walsenders of the safekeepers and PgBouncer's idle server connections, closed after 10 s, do not count).
The timeout is the endpoint's (`--suspend-timeout` at `branch create` or `endpoint start`, else the
project's default; 0 = never). A suspended endpoint is stopped as by `endpoint stop`, and remembered as
suspended, so `endpoint list` and `status` show it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from neonctl.engine.compute.admin_query import query_row
from neonctl.engine.compute.endpoint import list_endpoints, stop_endpoint
from neonctl.engine.compute.scale_to_zero import (
    effective_suspend_timeout,
    mark_suspended,
)
from neonctl.engine.project import Project
from neonctl.engine.proxy.sessions import Sessions
from neonctl.errors import NeonctlError

log = logging.getLogger("proxy.suspend")
# Connections the proxy itself keeps (PgBouncer's, the /sql cache's) are not clients: the proxy counts the
# requests and sessions that use them.
CLIENTS_SQL = ("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
               " AND pid <> pg_backend_pid()"
               " AND application_name NOT IN ('neonctl-pgbouncer', 'neonctl-sql-over-http')")


def _client_backends(st) -> int:
    try:
        return int(query_row(st.socket_dir, st.port, CLIENTS_SQL, timeout=5)[0])
    except (NeonctlError, OSError, IndexError, ValueError):
        return 1  # cannot tell: treat as busy, never suspend on a guess


def sweep(project: Project, sessions: Sessions, idle_since: dict[str, float], now: float) -> list[str]:
    """One pass: suspend every running endpoint idle for longer than its timeout; returns their names."""
    suspended = []
    seen = set()
    project.reload()  # timeouts and branches change under a running proxy
    for st, status in list_endpoints(project):
        if status != "running":
            continue
        seen.add(st.name)
        timeout = effective_suspend_timeout(project, st)
        if not timeout:
            continue
        if sessions.active.get(st.name) or _client_backends(st) > 0:
            idle_since[st.name] = now
            continue
        since = idle_since.setdefault(st.name, now)
        if now - since >= timeout:
            log.info("suspending %s: no client for %.0f s (suspend timeout %s s)", st.name, now - since, timeout)
            try:
                mark_suspended(project, stop_endpoint(project, st.name))
                suspended.append(st.name)
            except NeonctlError as e:
                log.warning("could not suspend %s: %s", st.name, e)
            idle_since.pop(st.name, None)
    for name in list(idle_since):
        if name not in seen:
            idle_since.pop(name)
    return suspended


async def run_suspender(project: Project, sessions: Sessions, stop: asyncio.Event, interval: float = 1.0,
                        on_suspend=lambda name: None) -> None:
    idle_since: dict[str, float] = {}
    while not stop.is_set():
        try:
            suspended = await asyncio.to_thread(sweep, project, sessions, idle_since, time.monotonic())
            for name in suspended:
                on_suspend(name)
        except Exception:  # noqa: BLE001 - a failed pass is logged and retried; suspension is best effort
            log.exception("suspend pass failed")
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass
