"""Wake on connect: find a branch's compute, starting it if it is not running, once for all who wait.

The proxy's half of Neon's "wake_compute": a connection for a branch without a running compute starts
one with the engine's own `endpoint start` (or a read-only time-travel start for `BRANCH@LSN|TIME`), on a
worker thread so the event loop keeps relaying other sessions. Concurrent connections for the same
endpoint share one start. A pooled target also gets its PgBouncer (`compute/pgbouncer.py`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from neonctl.engine.compute import pgbouncer
from neonctl.engine.compute.endpoint import (
    EndpointState,
    endpoint_status,
    read_state,
    start_endpoint,
)
from neonctl.engine.compute.time_travel import find_running, start_time_travel
from neonctl.engine.project import Project
from neonctl.engine.timepoint import TimePoint, parse_ref

log = logging.getLogger("proxy.wake")


@dataclass(frozen=True)
class ComputeAddress:
    """Where the proxy connects for a session: a Unix socket directory and port (Postgres or PgBouncer)."""

    endpoint: str  # the endpoint's name: `branch` or `branch@X/Y`
    host: str
    port: int
    pg_host: str  # the compute itself (cancel requests go here even for pooled sessions)
    pg_port: int


def _running(project: Project, name: str) -> EndpointState | None:
    st = read_state(project, name)
    return st if st is not None and endpoint_status(st) == "running" else None


class Waker:
    def __init__(self, project: Project):
        self.project = project
        self._inflight: dict[str, asyncio.Future] = {}

    def point(self, branch: str | None, at: str | None) -> TimePoint:
        """Parse (and check) the routing target; raises InvalidInput for a malformed point."""
        branch = branch or self.project.config.default_branch
        return parse_ref(f"{branch}@{at}") if at else TimePoint(branch)

    async def wake(self, point: TimePoint, pooled: bool) -> ComputeAddress:
        """The address to connect to for `point`, after starting what is missing. Raises NeonctlError."""
        self.project.branch(point.branch)  # unknown branch: NotFound, before anything starts
        if point.lsn is None and point.timestamp is None:
            st = _running(self.project, point.branch)
            key = point.branch
        else:
            st = await asyncio.to_thread(find_running, self.project, point)
            key = f"{point.branch}@{point.lsn}@{point.timestamp}"
        if st is None:
            st = await self._shared(key, lambda: self._start(point))
        if not pooled:
            return ComputeAddress(st.name, st.socket_dir, st.port, st.socket_dir, st.port)
        host, port = await self._shared(f"pooler:{st.name}", lambda: pgbouncer.ensure(self.project, st))
        return ComputeAddress(st.name, host, port, st.socket_dir, st.port)

    async def _shared(self, key: str, fn):
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(asyncio.to_thread(fn))
            self._inflight[key] = fut
            fut.add_done_callback(lambda _f: self._inflight.pop(key, None))
        return await asyncio.shield(fut)

    def _start(self, point: TimePoint) -> EndpointState:
        if point.lsn is None and point.timestamp is None:
            st = _running(self.project, point.branch)  # another waker (or the CLI) may have started it
            if st is not None:
                return st
            log.info("waking %s", point.branch)
            return start_endpoint(self.project, point.branch)
        log.info("starting time-travel endpoint for %s", point)
        st, _started = start_time_travel(self.project, point, reuse=True)
        return st
