"""Live client sessions of the proxy: how many each endpoint has, and the cancel keys that name them.

The proxy gives each client its own BackendKeyData (pid, secret) and remembers which compute session it
stands for, so a CancelRequest - which arrives on a fresh connection carrying only that key - reaches the
compute that runs the query, even with many computes behind one address (Neon's proxy does the same).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CancelTarget:
    """Where a cancel goes: the compute's socket and the key its backend gave the proxy."""

    host: str
    port: int
    pid: int
    secret: int


@dataclass
class Sessions:
    active: dict[str, int] = field(default_factory=dict)  # endpoint name -> open client sessions
    last_seen: dict[str, float] = field(default_factory=dict)  # endpoint name -> last session end or start
    _cancel: dict[tuple[int, int], CancelTarget] = field(default_factory=dict)

    def opened(self, endpoint: str) -> None:
        self.active[endpoint] = self.active.get(endpoint, 0) + 1
        self.last_seen[endpoint] = time.monotonic()

    def closed(self, endpoint: str) -> None:
        n = self.active.get(endpoint, 0) - 1
        if n > 0:
            self.active[endpoint] = n
        else:
            self.active.pop(endpoint, None)
        self.last_seen[endpoint] = time.monotonic()

    def issue_key(self, target: CancelTarget) -> tuple[int, int]:
        """A fresh (pid, secret) for the client, standing for `target`."""
        while True:
            key = (secrets.randbits(31) or 1, secrets.randbits(31))
            if key not in self._cancel:
                self._cancel[key] = target
                return key

    def forget_key(self, key: tuple[int, int] | None) -> None:
        if key is not None:
            self._cancel.pop(key, None)

    def cancel_target(self, pid: int, secret: int) -> CancelTarget | None:
        return self._cancel.get((pid, secret))

    def total(self) -> int:
        return sum(self.active.values())
