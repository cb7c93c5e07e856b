"""Authenticated compute connections kept for SQL over HTTP, per (endpoint, role, database).

Neon's proxy keeps connections for its HTTP path so that a request does not pay a Postgres connection
set-up (fork, catalog cache, authentication). A connection goes back to the cache only when it is idle
(outside a transaction) and healthy; idle ones are closed after `idle_timeout`, and all of an endpoint's
when its compute is suspended or restarted (a dead one is detected and replaced on the next checkout).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from neonctl.engine.proxy.backend_conn import BackendConn

MAX_IDLE_PER_KEY = 16


class ConnCache:
    def __init__(self, idle_timeout: float = 60.0):
        self.idle_timeout = idle_timeout
        self._idle: dict[tuple, list[tuple[float, BackendConn]]] = defaultdict(list)
        self.hits = 0
        self.misses = 0

    async def checkout(self, key: tuple, socket_dir: str, port: int, user: str, database: str) -> BackendConn:
        """An idle connection for `key` to the compute at (socket_dir, port), or a new one."""
        stack = self._idle.get(key, [])
        while stack:
            _t, conn = stack.pop()
            if not conn.broken and conn.key == key and not conn.reader.at_eof():
                self.hits += 1
                return conn
            conn.close()
        self.misses += 1
        return await BackendConn.connect(socket_dir, port, user, database, key)

    def checkin(self, conn: BackendConn) -> None:
        if conn.broken or conn.status != b"I" or len(self._idle[conn.key]) >= MAX_IDLE_PER_KEY:
            conn.close()
            return
        self._idle[conn.key].append((time.monotonic(), conn))

    def drop_endpoint(self, endpoint: str) -> None:
        for key in [k for k in self._idle if k[0] == endpoint]:
            for _t, conn in self._idle.pop(key):
                conn.close()

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for key in list(self._idle):
            keep = []
            for t, conn in self._idle[key]:
                if now - t > self.idle_timeout or conn.broken:
                    conn.close()
                else:
                    keep.append((t, conn))
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def idle_count(self, endpoint: str) -> int:
        return sum(len(v) for k, v in self._idle.items() if k[0] == endpoint)

    async def run_expiry(self, stop: asyncio.Event, interval: float = 5.0) -> None:
        while not stop.is_set():
            self.expire()
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
