"""Loopback port allocation: daemons get fixed ports per project, endpoints from 55432 upward."""

from __future__ import annotations

import socket

from neonctl.errors import Conflict

ENDPOINT_BASE_PORT = 55432


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def allocate(base: int, taken: set[int], count: int = 1) -> list[int]:
    """The first `count` ports from `base` that are free now and not promised to anyone else."""
    out: list[int] = []
    port = base
    while len(out) < count:
        if port > 65535:
            raise Conflict(f"no free port at or above {base} on 127.0.0.1", hint="stop something that listens there")
        if port not in taken and port_free(port):
            out.append(port)
        port += 1
    return out


def ephemeral_port() -> int:
    """A loopback port nobody listens on right now (the kernel's pick), for a short-lived private server."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

