"""The Postgres protocol as the proxy's clients speak it, sans-I/O: bytes in, events out, bytes built.

A server's side of start-up (what `engine/pgwire.py` is for the replication client): the first packet
of a connection is a StartupMessage, an SSLRequest or GSSENCRequest (answered `N`: plain connections on
127.0.0.1), or a CancelRequest; then authentication messages; errors are ErrorResponses with a SQLSTATE.
`parse_initial` takes whatever bytes arrived and says what they are, or that more are needed. Neon's
routing conventions live here too, as pure functions over the start-up parameters.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from urllib.parse import unquote

from neonctl.engine.pgwire import message

PROTOCOL_V3 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
MAX_STARTUP_PACKET = 10000  # Postgres's MAX_STARTUP_PACKET_LENGTH


class ProtocolViolation(Exception):
    """The client broke the protocol (or asked for something unsupported): answer with this SQLSTATE."""

    def __init__(self, sqlstate: str, message: str):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


@dataclass(frozen=True)
class SSLRequest:
    pass


@dataclass(frozen=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    pid: int
    secret: int


@dataclass(frozen=True)
class Startup:
    version: int
    params: dict[str, str]


def parse_initial(buf: bytes | bytearray) -> tuple[object, int] | None:
    """The first packet in `buf` as (event, bytes used), or None if it is not complete yet."""
    if len(buf) < 4:
        return None
    (length,) = struct.unpack_from("!I", buf, 0)
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolViolation("08P01", "invalid length of startup packet")
    if len(buf) < length:
        return None
    (code,) = struct.unpack_from("!I", buf, 4)
    if code == SSL_REQUEST and length == 8:
        return SSLRequest(), 8
    if code == GSSENC_REQUEST and length == 8:
        return GSSENCRequest(), 8
    if code == CANCEL_REQUEST:
        if length != 16:
            raise ProtocolViolation("08P01", "invalid length of cancel request")
        pid, secret = struct.unpack_from("!iI", buf, 8)
        return CancelRequest(pid, secret), 16
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise ProtocolViolation("08P01", f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")
    return Startup(code, _params(bytes(buf[8:length]))), length


def _params(body: bytes) -> dict[str, str]:
    if not body.endswith(b"\0"):
        raise ProtocolViolation("08P01", "invalid startup packet layout: expected terminator as last byte")
    raw = body[:-1]  # the name/value strings, each NUL-terminated, without the list's own terminator
    if raw and not raw.endswith(b"\0"):
        raise ProtocolViolation("08P01", "invalid startup packet layout: expected terminator as last byte")
    parts = raw[:-1].split(b"\0") if raw else []
    if len(parts) % 2:
        raise ProtocolViolation("08P01", "invalid startup packet layout: a parameter has no value")
    try:
        params = {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts), 2)}
    except UnicodeDecodeError:
        raise ProtocolViolation("08P01", "invalid startup packet: parameters are not UTF-8") from None
    if not params.get("user"):
        raise ProtocolViolation("28000", "no PostgreSQL user name specified in startup packet")
    return params


# -- client messages after start-up ----------------------------------------------------------------------


def parse_password(body: bytes) -> str:
    """A PasswordMessage after AuthenticationCleartextPassword."""
    if not body.endswith(b"\0"):
        raise ProtocolViolation("08P01", "invalid password packet")
    try:
        return body[:-1].decode()
    except UnicodeDecodeError:
        raise ProtocolViolation("08P01", "password is not UTF-8") from None


def parse_sasl_initial(body: bytes) -> tuple[str, bytes | None]:
    """A SASLInitialResponse: (mechanism, initial data or None)."""
    end = body.find(b"\0")
    if end < 0 or len(body) < end + 5:
        raise ProtocolViolation("08P01", "invalid SASLInitialResponse")
    mechanism = body[:end].decode(errors="replace")
    (n,) = struct.unpack_from("!i", body, end + 1)
    data = body[end + 5:]
    if n == -1:
        return mechanism, None
    if n != len(data):
        raise ProtocolViolation("08P01", "invalid SASLInitialResponse length")
    return mechanism, data


def parse_backend_key_data(body: bytes) -> tuple[int, int]:
    pid, secret = struct.unpack_from("!iI", body, 0)
    return pid, secret


# -- server messages --------------------------------------------------------------------------------------


AUTH_OK, AUTH_CLEARTEXT, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 0, 3, 10, 11, 12  # Authentication*


def _auth(code: int, payload: bytes = b"") -> bytes:
    return message(b"R", struct.pack("!I", code) + payload)


def auth_ok() -> bytes:
    return _auth(AUTH_OK)


def auth_cleartext() -> bytes:
    return _auth(AUTH_CLEARTEXT)


def auth_sasl(mechanisms: list[str]) -> bytes:
    return _auth(AUTH_SASL, b"".join(m.encode() + b"\0" for m in mechanisms) + b"\0")


def auth_sasl_continue(data: bytes) -> bytes:
    return _auth(AUTH_SASL_CONTINUE, data)


def auth_sasl_final(data: bytes) -> bytes:
    return _auth(AUTH_SASL_FINAL, data)


def _fields(severity: str, sqlstate: str, text: str, detail: str | None, hint: str | None) -> bytes:
    out = [b"S" + severity.encode(), b"V" + severity.encode(), b"C" + sqlstate.encode(), b"M" + text.encode()]
    if detail:
        out.append(b"D" + detail.encode())
    if hint:
        out.append(b"H" + hint.encode())
    return b"\0".join(out) + b"\0\0"


def error_response(sqlstate: str, text: str, severity: str = "FATAL", detail: str | None = None,
                   hint: str | None = None) -> bytes:
    return message(b"E", _fields(severity, sqlstate, text, detail, hint))


def notice_response(text: str, sqlstate: str = "00000", severity: str = "NOTICE", detail: str | None = None,
                    hint: str | None = None) -> bytes:
    return message(b"N", _fields(severity, sqlstate, text, detail, hint))


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", name.encode() + b"\0" + value.encode() + b"\0")


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(b"K", struct.pack("!iI", pid, secret))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def cancel_request(pid: int, secret: int) -> bytes:
    return struct.pack("!IIiI", 16, CANCEL_REQUEST, pid, secret)


# -- Neon's routing conventions ------------------------------------------------------------------------------

_BRANCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$")
_OPTION_RE = re.compile(r"(?:^|\s)(?:--)?endpoint(?:=|%3[dD])(\S+)")


@dataclass(frozen=True)
class EndpointTarget:
    branch: str
    at: str | None  # an LSN or a timestamp, as the client wrote it
    pooled: bool


def split_endpoint_option(options: str | None) -> tuple[str | None, str | None]:
    """(`endpoint=NAME` from the startup `options`, the other options to forward to Postgres or None)."""
    if not options:
        return None, options
    m = _OPTION_RE.search(options)
    if m is None:
        return None, options
    rest = (options[: m.start()] + " " + options[m.end():]).strip()
    return unquote(m.group(1)), rest or None


def endpoint_from_password(password: str) -> tuple[str | None, str]:
    """Neon's password form for clients that cannot set options: `endpoint=NAME;PASSWORD` or `...$PASSWORD`."""
    if password.startswith("endpoint="):
        rest = password[len("endpoint="):]
        cut = min((i for i in (rest.find(";"), rest.find("$")) if i >= 0), default=-1)
        if cut > 0:
            return rest[:cut], rest[cut + 1:]
    return None, password


def parse_endpoint(name: str) -> EndpointTarget:
    """`BRANCH[@LSN|@TIMESTAMP][-pooler]` -> target; the point is checked later by the engine."""
    pooled = name.endswith("-pooler")
    if pooled:
        name = name[: -len("-pooler")]
    branch, sep, at = name.partition("@")
    if not _BRANCH_RE.match(branch) or (sep and not at):
        raise ProtocolViolation("08004", f"invalid endpoint {name!r}: expected BRANCH, BRANCH@LSN or BRANCH@TIMESTAMP")
    return EndpointTarget(branch, at or None, pooled)
