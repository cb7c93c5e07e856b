"""PostgreSQL frontend/backend protocol v3, the parts a replication client needs.

Sans-I/O: functions build messages as bytes and `MessageBuffer` splits a byte
stream into (type, body) messages, so the safekeeper's asyncio receiver is a
thin loop around them and the codec is testable with byte strings alone.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from neonctl.engine.timepoint import PG_EPOCH_UNIX

PROTOCOL_V3 = 196608
# Postgres timestamps count microseconds from 2000-01-01.
PG_EPOCH_OFFSET_US = PG_EPOCH_UNIX * 1_000_000


def pg_now() -> int:
    return int(time.time() * 1_000_000) - PG_EPOCH_OFFSET_US


def startup_message(params: dict[str, str]) -> bytes:
    body = struct.pack("!I", PROTOCOL_V3)
    for k, v in params.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def query(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\0")


def terminate() -> bytes:
    return message(b"X")


def copy_data(payload: bytes) -> bytes:
    return message(b"d", payload)


def standby_status_update(write_lsn: int, flush_lsn: int, apply_lsn: int, reply: bool = False) -> bytes:
    """'r' message: tells the walsender how far we have written and durably flushed."""
    return copy_data(b"r" + struct.pack("!QQQqB", write_lsn, flush_lsn, apply_lsn, pg_now(), int(reply)))


@dataclass(frozen=True)
class XLogData:
    start_lsn: int
    server_wal_end: int
    data: bytes


@dataclass(frozen=True)
class Keepalive:
    server_wal_end: int
    reply_requested: bool


def parse_copy_payload(payload: bytes) -> XLogData | Keepalive | None:
    """Decode a CopyData payload from a walsender ('w' WAL data or 'k' keepalive)."""
    kind = payload[:1]
    if kind == b"w":
        start, end, _ts = struct.unpack_from("!QQq", payload, 1)
        return XLogData(start, end, payload[25:])
    if kind == b"k":
        end, _ts, reply = struct.unpack_from("!QqB", payload, 1)
        return Keepalive(end, bool(reply))
    return None


class ServerError(Exception):
    """An ErrorResponse from the server; `fields` maps protocol field codes (S, C, M, ...) to text."""

    def __init__(self, fields: dict[str, str]):
        self.fields = fields
        super().__init__(f"{fields.get('S', 'ERROR')}: {fields.get('M', '')} (SQLSTATE {fields.get('C', '?')})")

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")


def parse_error_fields(body: bytes) -> dict[str, str]:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields


def parse_data_row(body: bytes) -> list[str | None]:
    (n,) = struct.unpack_from("!H", body, 0)
    pos, out = 2, []
    for _ in range(n):
        (ln,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if ln < 0:
            out.append(None)
        else:
            out.append(body[pos : pos + ln].decode())
            pos += ln
    return out


class MessageBuffer:
    """Accumulates bytes from the server and yields complete (type, body) messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def has_message(self) -> bool:
        if len(self._buf) < 5:
            return False
        return len(self._buf) >= 1 + struct.unpack_from("!I", self._buf, 1)[0]

    def next_message(self) -> tuple[bytes, bytes] | None:
        if len(self._buf) < 5:
            return None
        (ln,) = struct.unpack_from("!I", self._buf, 1)
        if len(self._buf) < 1 + ln:
            return None
        kind = bytes(self._buf[:1])
        body = bytes(self._buf[5 : 1 + ln])
        del self._buf[: 1 + ln]
        return kind, body
