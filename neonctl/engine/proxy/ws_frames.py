"""WebSocket (RFC 6455) as the proxy's WebSocket port speaks it, sans-I/O: bytes in, requests and frames out.

The opening handshake: `parse_request` reads an HTTP/1.1 request head from whatever bytes arrived (or says
more are needed), `accept` checks that it is a WebSocket upgrade (`GET`, `Upgrade: websocket`,
`Connection: upgrade`, `Sec-WebSocket-Version: 13`, a 16-byte `Sec-WebSocket-Key`) to one of the served
paths and returns the `101 Switching Protocols` answer with its `Sec-WebSocket-Accept`; anything else is a
`HandshakeError` whose `response()` is the HTTP error to send before closing. No extension (no
permessage-deflate: Postgres messages are small and latency is the point) and no subprotocol is agreed.

Frames: `FrameDecoder.feed` takes the bytes a client sent and returns the complete messages and control
frames in them, in order, as (opcode, payload): fragments are joined, the client's mandatory mask is
removed, text must be UTF-8 and a message may not exceed `max_message` bytes. A frame that breaks the
protocol raises `ProtocolError` with the close code to answer with (1002 protocol error, 1007 invalid
data, 1009 too big). The server's own frames are not masked: `frame` builds one, `binary_header` is the
2-10 bytes put in front of the Postgres bytes of a binary frame.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
MAX_REQUEST_HEAD = 16 * 1024  # request line and headers
MAX_MESSAGE = 16 * 1024 * 1024  # what aiohttp's server allowed the driver before; Postgres caps messages at 1 GB

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
# codes a peer may send (1004-1006 and 1015 are reserved for local use); 3000-4999 are applications'
_VALID_CLOSE = frozenset((1000, 1001, 1002, 1003, *range(1007, 1015)))

_REASONS = {400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            426: "Upgrade Required", 431: "Request Header Fields Too Large"}

_SMALL_BINARY = [bytes((0x80 | OP_BINARY, n)) for n in range(126)]


class HandshakeError(Exception):
    """The request is not a WebSocket upgrade we serve: answer `response()` and close."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers

    def response(self) -> bytes:
        body = json.dumps({"message": self.message}).encode()
        head = [f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Error')}", "Content-Type: application/json",
                f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in self.headers)]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class ProtocolError(Exception):
    """The client broke RFC 6455: close the connection with this code."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # as sent: path and query
    headers: dict[str, str]  # lower-case names; a repeated header's values joined with ", "

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


# -- the opening handshake ---------------------------------------------------------------------------


def parse_request(buf: bytes | bytearray) -> tuple[Request, int] | None:
    """The request head at the start of `buf` and the bytes it used, or None if it is not complete yet."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_REQUEST_HEAD:
            raise HandshakeError(431, "request head too large")
        return None
    if end > MAX_REQUEST_HEAD:
        raise HandshakeError(431, "request head too large")
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2].startswith("HTTP/"):
        raise HandshakeError(400, "malformed request line")
    method, target, version = parts
    if version != "HTTP/1.1":
        raise HandshakeError(400, f"{version} cannot upgrade to a WebSocket: HTTP/1.1 is required")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name or "\t" in name:
            raise HandshakeError(400, "malformed header line")
        name, value = name.lower(), value.strip(" \t")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return Request(method, target, headers), end + 4


def _tokens(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",")}


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode("latin-1")).digest()).decode()


def accept(req: Request, paths: tuple[str, ...]) -> bytes:
    """The 101 answer to a valid upgrade request for one of `paths`; HandshakeError otherwise."""
    if req.path not in paths:
        raise HandshakeError(404, f"no WebSocket at {req.path}: use {' or '.join(paths)}")
    if req.method != "GET":
        raise HandshakeError(405, "a WebSocket upgrade is a GET request", (("Allow", "GET"),))
    if "websocket" not in _tokens(req.headers.get("upgrade", "")):
        raise HandshakeError(426, "expected a WebSocket upgrade (Upgrade: websocket)", (("Upgrade", "websocket"),))
    if "upgrade" not in _tokens(req.headers.get("connection", "")):
        raise HandshakeError(400, "expected Connection: upgrade")
    if req.headers.get("sec-websocket-version", "").strip() != "13":
        raise HandshakeError(426, "unsupported WebSocket version: 13 is supported", (("Sec-WebSocket-Version", "13"),))
    key = req.headers.get("sec-websocket-key", "").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError(key)
    except (ValueError, binascii.Error):
        raise HandshakeError(400, "Sec-WebSocket-Key must be 16 bytes in base64") from None
    return ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n").encode("latin-1")


# -- frames --------------------------------------------------------------------------------------------


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR `payload` with the 4-byte `mask` repeated (masking and unmasking are the same operation): one XOR
    of two big integers, linear and in C at any size (no per-byte Python loop, no numpy import)."""
    n = len(payload)
    if n == 0:
        return b""
    key = (mask * ((n + 3) >> 2))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def binary_header(n: int) -> bytes:
    """The header of an unmasked, final binary frame of n payload bytes."""
    if n < 126:
        return _SMALL_BINARY[n]
    if n < 1 << 16:
        return b"\x82\x7e" + n.to_bytes(2, "big")
    return b"\x82\x7f" + n.to_bytes(8, "big")


def frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """One unmasked (server) frame."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, n))
    elif n < 1 << 16:
        head = bytes((b0, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, 127)) + n.to_bytes(8, "big")
    return head + payload


def close_frame(code: int = CLOSE_NORMAL, reason: str = "") -> bytes:
    body = code.to_bytes(2, "big") + reason.encode()[:123]  # a control frame carries at most 125 bytes
    return frame(OP_CLOSE, body)


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """A close frame's (code, reason); code None when the frame had no body. ProtocolError if invalid."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte body")
    code = int.from_bytes(payload[:2], "big")
    if code not in _VALID_CLOSE and not 3000 <= code <= 4999:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise ProtocolError(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
    return code, reason


class FrameDecoder:
    """Client frames -> messages. Keeps what a partial frame and a fragmented message have so far."""

    def __init__(self, max_message: int = MAX_MESSAGE):
        self.max_message = max_message
        self.closed = False  # a close frame was read: nothing after it is looked at
        self._buf = bytearray()  # the start of an incomplete frame
        self._need = 0  # bytes `_buf` must hold before parsing is worth trying again
        self._frag_op = OP_CONT  # opcode of the fragmented message in progress (OP_CONT: none)
        self._frags: list[bytes] = []
        self._frag_len = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """(opcode, payload) of each complete message (OP_BINARY, OP_TEXT) and control frame (OP_PING,
        OP_PONG, OP_CLOSE - its body checked by `parse_close`) now complete, in order."""
        if self.closed:
            return []
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return []
            data = bytes(self._buf)
            self._buf.clear()
        out: list[tuple[int, bytes]] = []
        pos, end = 0, len(data)
        need = 2
        while end - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            op, n = b0 & 0x0F, b1 & 0x7F
            if b0 & 0x70:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set, but no extension was agreed")
            if not b1 & 0x80:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "a client's frames must be masked")
            head = 6
            if op >= OP_CLOSE:
                if op > OP_PONG:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {op:#x}")
                if not b0 & 0x80:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "a control frame cannot be fragmented")
                if n > 125:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "a control frame carries at most 125 bytes")
            else:
                if op > OP_BINARY:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {op:#x}")
                if op == OP_CONT:
                    if self._frag_op == OP_CONT:
                        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation frame without a message to continue")
                elif self._frag_op != OP_CONT:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "a new message inside a fragmented one")
                if n == 126:
                    if end - pos < 4:
                        need = 4
                        break
                    n = int.from_bytes(data[pos + 2:pos + 4], "big")
                    head = 8
                elif n == 127:
                    if end - pos < 10:
                        need = 10
                        break
                    n = int.from_bytes(data[pos + 2:pos + 10], "big")
                    if n >> 63:
                        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "64-bit payload length with the high bit set")
                    head = 14
                if self._frag_len + n > self.max_message:
                    raise ProtocolError(CLOSE_TOO_BIG, f"message larger than {self.max_message} bytes")
            stop = pos + head + n
            if stop > end:
                need = head + n
                break
            payload = unmask(data[stop - n:stop], data[stop - n - 4:stop - n])
            pos = stop
            if op >= OP_CLOSE:
                if op == OP_CLOSE:
                    parse_close(payload)
                    out.append((op, payload))
                    self.closed = True
                    return out
                out.append((op, payload))
            elif b0 & 0x80:
                if op == OP_CONT:
                    self._frags.append(payload)
                    payload, op = b"".join(self._frags), self._frag_op
                    self._frags, self._frag_len, self._frag_op = [], 0, OP_CONT
                if op == OP_TEXT:
                    try:
                        payload.decode()
                    except UnicodeDecodeError:
                        raise ProtocolError(CLOSE_INVALID_DATA, "text message is not UTF-8") from None
                out.append((op, payload))
            else:
                if op != OP_CONT:
                    self._frag_op = op
                self._frags.append(payload)
                self._frag_len += n
        if pos < end:
            self._buf += data[pos:]
            self._need = need
        return out
