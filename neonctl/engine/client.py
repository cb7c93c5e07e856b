"""Synchronous JSON-over-HTTP client the CLI uses to talk to the storage daemons.

A daemon's JSON error ({"error", "kind", "hint"}) comes back as the same
NeonctlError subclass; a daemon that does not answer becomes a DaemonError
naming it.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
from dataclasses import dataclass

from neonctl import errors

# daemon address -> the project's API credential (engine/credentials.py fills it when a project is loaded)
_TOKENS: dict[str, str] = {}


def set_token(address: str, token: str) -> None:
    _TOKENS[address] = token


class _LoopbackConnection(http.client.HTTPConnection):
    """Refuses a TCP self-connection.

    Connecting to a loopback port in the ephemeral range that nothing listens on
    can connect the socket to itself (Linux picks the same port as the source);
    the request then comes back as the response. Seen while polling a daemon
    that was still starting: treat it as "nothing listens there yet".
    """

    def connect(self) -> None:
        super().connect()
        if self.sock.getsockname() == self.sock.getpeername():
            # Reset rather than close: a closed self-connection lingers in TIME_WAIT and keeps the port
            # that the daemon is about to bind.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
            self.sock = None
            raise ConnectionRefusedError("nothing listens there (the socket connected to itself)")


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def request(address: str, method: str, path: str, data: bytes | None = None,
            timeout: float = 30.0) -> Reply:
    """One HTTP request to a daemon on `host:port`; OSError when it cannot be reached or answers garbage."""
    host, _, port = address.rpartition(":")
    conn = _LoopbackConnection(host, int(port), timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if data is not None else {}
        token = _TOKENS.get(address)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        return Reply(r.status, r.headers, r.read())
    except http.client.HTTPException as e:
        raise ConnectionError(f"not an HTTP answer ({type(e).__name__}: {e})") from None
    finally:
        conn.close()


def status(name: str, address: str, timeout: float = 30.0) -> dict:
    """`GET /v1/status` of any neonctl daemon (each answers it; the typed clients cover the rest)."""
    return call(name, address, "GET", "/v1/status", timeout=timeout)


def call(name: str, address: str, method: str, path: str, body: dict | None = None,
         timeout: float = 30.0) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    try:
        reply = request(address, method, path, data, timeout)
    except OSError as e:
        raise errors.DaemonError(f"{name} at {address} is not reachable: {e}",
                                 hint="run `neonctl start`") from None
    if reply.status < 400:
        return json.loads(reply.body or b"{}")
    try:
        payload = json.loads(reply.body)
    except ValueError:
        raise errors.DaemonError(f"{name} answered HTTP {reply.status} to {method} {path}") from None
    cls = errors.error_class(payload.get("kind")) or errors.DaemonError
    raise cls(payload.get("error", f"HTTP {reply.status}"), payload.get("hint"))


def set_failpoints(name: str, address: str, points: dict[str, str]) -> dict:
    """Arm fault points in a daemon started with NEONCTL_TESTING=1 (`engine/failpoints.py`); {} disarms."""
    return call(name, address, "PUT", "/v1/failpoints", points)
