"""A connection from the proxy to a compute, for SQL over HTTP: one query at a time, values as raw text.

The `/sql` endpoint answers with exactly what the compute sent: each value's text form (the serverless
driver parses it by type OID, as node-postgres does), each field's table, column, type, size and
modifier, the command tag, and an error's every field. A driver would convert and lose that, so this
speaks the extended query protocol itself over the compute's Unix socket (trusted there, as for all of
neonctl's own connections): Parse/Bind/Describe/Execute/Sync with text parameters, `$1`-style
placeholders and nulls, or a simple Query when there are no parameters.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

from neonctl.engine import pgwire

# ErrorResponse field codes -> the names Neon's /sql uses (and the driver copies onto NeonDbError)
ERROR_FIELDS = {"S": "severity", "C": "code", "M": "message", "D": "detail", "H": "hint", "P": "position",
                "p": "internalPosition", "q": "internalQuery", "W": "where", "s": "schema", "t": "table",
                "c": "column", "d": "dataType", "n": "constraint", "F": "file", "L": "line", "R": "routine"}


class QueryError(Exception):
    """The compute answered with an ErrorResponse; `fields` has Neon's names (code, message, detail...)."""

    def __init__(self, fields: dict[str, str]):
        super().__init__(fields.get("message", "error"))
        self.fields = fields


@dataclass
class Result:
    command: str = ""
    row_count: int | None = None
    fields: list[dict] = field(default_factory=list)
    rows: list[list[str | None]] = field(default_factory=list)


def _cstring(s: str) -> bytes:
    return s.encode() + b"\0"


def parse_row_description(body: bytes) -> list[dict]:
    (n,) = struct.unpack_from("!H", body, 0)
    pos, out = 2, []
    for _ in range(n):
        end = body.index(b"\0", pos)
        name = body[pos:end].decode()
        table, column, type_oid, size, modifier, fmt = struct.unpack_from("!IhIhih", body, end + 1)
        pos = end + 19
        out.append({"name": name, "dataTypeID": type_oid, "tableID": table, "columnID": column,
                    "dataTypeSize": size, "dataTypeModifier": modifier, "format": "text" if fmt == 0 else "binary"})
    return out


def command_and_count(tag: str) -> tuple[str, int | None]:
    """`INSERT 0 3` -> ("INSERT", 3), `SELECT 2` -> ("SELECT", 2), `BEGIN` -> ("BEGIN", None)."""
    parts = tag.split()
    if not parts:
        return "", None
    if parts[-1].isdigit() and len(parts) > 1:
        return parts[0], int(parts[-1])
    return parts[0], None


class BackendConn:
    """One compute connection. Not concurrent: the connection cache hands it to one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: tuple):
        self.reader, self.writer, self.key = reader, writer, key
        self.buf = pgwire.MessageBuffer()
        self.status = b"I"  # ReadyForQuery's transaction status: I idle, T in a transaction, E failed
        self.broken = False
        self.queries_run = 0

    @classmethod
    async def connect(cls, socket_dir: str, port: int, user: str, database: str, key: tuple,
                      timeout: float = 10.0) -> BackendConn:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(f"{socket_dir}/.s.PGSQL.{port}"), timeout)
        conn = cls(reader, writer, key)
        writer.write(pgwire.startup_message({"user": user, "database": database,
                                             "application_name": "neonctl-sql-over-http"}))
        while True:
            kind, body = await conn._next()
            if kind == b"E":
                conn.close()
                raise QueryError(_error(body))
            if kind == b"R" and body[:4] != b"\0\0\0\0":
                conn.close()
                raise QueryError({"message": "the compute asked the proxy for a password", "code": "08006"})
            if kind == b"Z":
                conn.status = body[:1]
                return conn

    async def _next(self) -> tuple[bytes, bytes]:
        while True:
            msg = self.buf.next_message()
            if msg is not None:
                return msg
            data = await self.reader.read(1 << 16)
            if not data:
                self.broken = True
                raise ConnectionError("the compute closed the connection")
            self.buf.feed(data)

    async def query(self, sql: str, params: list[str | None] | None = None) -> Result:
        """Run one statement; raises QueryError (the connection stays usable) or ConnectionError."""
        self.queries_run += 1
        if params:
            out = [pgwire.message(b"P", b"\0" + _cstring(sql) + struct.pack("!H", 0))]
            bind = b"\0\0" + struct.pack("!H", 0) + struct.pack("!H", len(params))
            for v in params:
                bind += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v.encode())) + v.encode()
            bind += struct.pack("!H", 0)
            out += [pgwire.message(b"B", bind), pgwire.message(b"D", b"P\0"),
                    pgwire.message(b"E", b"\0" + struct.pack("!i", 0)), pgwire.message(b"S")]
            self.writer.write(b"".join(out))
        else:
            self.writer.write(pgwire.query(sql))
        res, results, error = Result(), [], None
        while True:
            kind, body = await self._next()
            if kind == b"T":
                res.fields = parse_row_description(body)
            elif kind == b"D":
                res.rows.append(pgwire.parse_data_row(body))
            elif kind == b"C":
                res.command, res.row_count = command_and_count(body[:-1].decode())
                results.append(res)
                res = Result()
            elif kind == b"I":  # EmptyQueryResponse
                results.append(res)
                res = Result()
            elif kind == b"E":
                error = _error(body)
            elif kind == b"Z":
                self.status = body[:1]
                break
        if error is not None:
            raise QueryError(error)
        return results[-1] if results else Result()

    def close(self) -> None:
        self.broken = True
        try:
            self.writer.write(pgwire.terminate())
        except (OSError, RuntimeError):
            pass
        self.writer.close()


def _error(body: bytes) -> dict[str, str]:
    raw = pgwire.parse_error_fields(body)
    return {ERROR_FIELDS[k]: v for k, v in raw.items() if k in ERROR_FIELDS}
