"""neonctl's own one-row checks against a compute, over the Postgres protocol codec in `engine/pgwire.py`.

The engine asks a freshly started compute a single question (is it out of recovery, where does it insert)
on every `endpoint start`. A driver is not needed for that, and importing psycopg costs ~70 ms of every CLI
call that starts a compute, a third of the CLI's whole overhead. Only trust authentication is spoken: these
connections are the superuser's administrative ones (loopback or the compute's private Unix socket).
"""

from __future__ import annotations

import socket
import time

from neonctl.engine import pgwire
from neonctl.errors import PostgresError


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    if host.startswith("/"):  # a Unix socket directory, as libpq's host= takes it
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(f"{host}/.s.PGSQL.{port}")
        return s
    return socket.create_connection((host, port), timeout=timeout)


def query_row(host: str, port: int, sql: str, user: str = "postgres", dbname: str = "postgres",
              timeout: float = 10.0) -> list[str | None]:
    """Run one simple query and return its first row as text values (an empty list if it has none)."""
    rows = query_rows(host, port, sql, user, dbname, timeout)
    return rows[0] if rows else []


def query_rows(host: str, port: int, sql: str, user: str = "postgres", dbname: str = "postgres",
               timeout: float = 10.0) -> list[list[str | None]]:
    """Run a simple query (several statements allowed) and return the rows of its results as text values."""
    return [row for result in query_results(host, port, sql, user, dbname, timeout) for row in result]


def query_results(host: str, port: int, sql: str, user: str = "postgres", dbname: str = "postgres",
                  timeout: float = 10.0) -> list[list[list[str | None]]]:
    """Run a simple query of several statements on one connection (a new backend costs milliseconds); the rows
    of each statement that returns rows, as text values."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = _connect(host, port, timeout)
            break
        except (FileNotFoundError, ConnectionRefusedError) as e:  # not listening (yet): wait, within the timeout
            if time.monotonic() > deadline:
                raise PostgresError(f"cannot connect to the compute at {host}:{port}: {e}") from e
            time.sleep(0.02)
        except OSError as e:
            raise PostgresError(f"cannot connect to the compute at {host}:{port}: {e}") from e
    buf = pgwire.MessageBuffer()
    results: list[list[list[str | None]]] = []
    with sock:
        sock.sendall(pgwire.startup_message({"user": user, "database": dbname, "application_name": "neonctl"}))
        sent_query = False
        while True:
            msg = buf.next_message()
            if msg is None:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    data = sock.recv(65536)
                except OSError as e:
                    raise PostgresError(f"compute at {host}:{port} did not answer: {e}") from e
                if not data:
                    raise PostgresError(f"compute at {host}:{port} closed the connection")
                buf.feed(data)
                continue
            kind, body = msg
            if kind == b"E":
                raise PostgresError(f"compute at {host}:{port}: {pgwire.ServerError(pgwire.parse_error_fields(body))}")
            if kind == b"R" and body[:4] != b"\0\0\0\0":
                raise PostgresError(f"compute at {host}:{port} asks for a password on an administrative connection")
            if kind == b"T":  # a statement's rows follow
                results.append([])
            elif kind == b"D":
                results[-1].append(pgwire.parse_data_row(body))
            elif kind == b"Z":
                if sent_query:
                    sock.sendall(pgwire.terminate())
                    return results
                sock.sendall(pgwire.query(sql))
                sent_query = True
