"""The proxy's WebSocket codec (RFC 6455) with bytes alone: handshake requests in, frames in, frames out."""

from __future__ import annotations

import base64
import json
import os
import struct

import pytest

from neonctl.engine.proxy import ws_frames as w

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3's example key...
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # ...and its Sec-WebSocket-Accept
PATHS = ("/v2", "/v1", "/")


def request(target: str = "/v2", method: str = "GET", version: str = "HTTP/1.1", **headers: str) -> bytes:
    h = {"Host": "127.0.0.1:4450", "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": KEY,
         "Sec-WebSocket-Version": "13"}
    h.update({k.replace("_", "-"): v for k, v in headers.items()})
    lines = [f"{method} {target} {version}"] + [f"{k}: {v}" for k, v in h.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def masked(op: int, payload: bytes, fin: bool = True, mask: bytes = b"\x37\xfa\x21\x3d", rsv: int = 0) -> bytes:
    """A client frame, built here byte by byte (independently of the code under test)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | rsv | op
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((b0, 0x80 | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, 0x80 | 127)) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_frames(data: bytes) -> list[tuple[int, bool, bytes]]:
    """(opcode, fin, payload) of unmasked frames, parsed here independently."""
    out, pos = [], 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        assert not b1 & 0x80, "server frames are never masked"
        n, pos = b1 & 0x7F, pos + 2
        if n == 126:
            (n,), pos = struct.unpack_from("!H", data, pos), pos + 2
        elif n == 127:
            (n,), pos = struct.unpack_from("!Q", data, pos), pos + 8
        out.append((b0 & 0x0F, bool(b0 & 0x80), data[pos:pos + n]))
        pos += n
    return out


def upgrade(raw: bytes) -> bytes:
    parsed = w.parse_request(raw)
    assert parsed is not None
    req, _ = parsed
    return w.accept(req, PATHS)


# -- handshake ---------------------------------------------------------------------------------------


def test_accept_key_is_the_rfc_example():
    assert w.accept_key(KEY) == ACCEPT


def test_request_byte_by_byte_then_complete_with_frames_behind_it():
    raw = request("/v1?address=127.0.0.1:4432")
    for i in range(len(raw)):
        assert w.parse_request(raw[:i]) is None
    req, used = w.parse_request(raw + b"\x82\x80rest")
    assert used == len(raw)
    assert req.method == "GET" and req.target == "/v1?address=127.0.0.1:4432" and req.path == "/v1"
    assert req.headers["sec-websocket-key"] == KEY and req.headers["upgrade"] == "websocket"


def test_upgrade_answer():
    answer = upgrade(request())
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and answer.endswith(b"\r\n\r\n")
    head = answer.decode().split("\r\n")
    assert f"Sec-WebSocket-Accept: {ACCEPT}" in head
    assert "Upgrade: websocket" in head and "Connection: Upgrade" in head
    assert not any(h.lower().startswith(("sec-websocket-extensions", "sec-websocket-protocol")) for h in head)


@pytest.mark.parametrize("raw", [
    request("/", Upgrade="WebSocket", Connection="keep-alive, Upgrade"),  # tokens, any case
    request("/v2", Sec_WebSocket_Extensions="permessage-deflate; client_max_window_bits"),  # ignored: none agreed
    request("/v2").replace(b"Connection: Upgrade", b"connection:upgrade"),  # no space after the colon
    request("/v2", Sec_WebSocket_Protocol="chat"),
])
def test_upgrade_variants_accepted(raw):
    assert b"101 Switching Protocols" in upgrade(raw)


def test_repeated_headers_are_joined():
    raw = request("/v2", Connection="keep-alive").replace(b"\r\n\r\n", b"\r\nConnection: Upgrade\r\n\r\n")
    req, _ = w.parse_request(raw)
    assert req.headers["connection"] == "keep-alive, Upgrade"
    assert b"101" in w.accept(req, PATHS)


@pytest.mark.parametrize("raw, status, text", [
    (request("/v3"), 404, "no WebSocket at /v3"),
    (request("/v2", method="POST"), 405, "GET"),
    (request("/v2", Upgrade=None), 426, "Upgrade: websocket"),
    (request("/v2", Upgrade="h2c"), 426, "Upgrade: websocket"),
    (request("/v2", Connection="keep-alive"), 400, "Connection: upgrade"),
    (request("/v2", Sec_WebSocket_Version="8"), 426, "version"),
    (request("/v2", Sec_WebSocket_Version=None), 426, "version"),
    (request("/v2", Sec_WebSocket_Key=None), 400, "Sec-WebSocket-Key"),
    (request("/v2", Sec_WebSocket_Key="short"), 400, "Sec-WebSocket-Key"),
    (request("/v2", Sec_WebSocket_Key=base64.b64encode(b"x" * 15).decode()), 400, "16 bytes"),
    (request("/v2", version="HTTP/1.0"), 400, "HTTP/1.1"),
    (b"GET /v2\r\n\r\n", 400, "request line"),
    (b"\x00\x00\x00\x08\x04\xd2\x16/\r\n\r\n", 400, "request line"),  # a Postgres SSLRequest, say
    (request("/v2").replace(b"Host:", b"Host :"), 400, "header"),
    (request("/v2").replace(b"\r\nHost", b"\r\n folded"), 400, "header"),
    (request("/v2", X_Big="y" * (w.MAX_REQUEST_HEAD + 1)), 431, "too large"),
    (b"GET /v2 HTTP/1.1\r\n" + b"X: y\r\n" * 4000, 431, "too large"),  # no end of the head yet
])
def test_bad_upgrade_requests(raw, status, text):
    with pytest.raises(w.HandshakeError) as e:
        upgrade(raw)
    assert e.value.status == status and text in e.value.message


def test_handshake_error_response():
    with pytest.raises(w.HandshakeError) as e:
        upgrade(request("/v2", Sec_WebSocket_Version="8"))
    resp = e.value.response()
    head, body = resp.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 426 Upgrade Required"
    assert "Connection: close" in lines and "Sec-WebSocket-Version: 13" in lines
    assert f"Content-Length: {len(body)}" in lines
    assert "version" in json.loads(body)["message"]


# -- client frames -----------------------------------------------------------------------------------


def test_the_rfc_masked_hello():
    assert w.FrameDecoder().feed(bytes.fromhex("818537fa213d7f9f4d5158")) == [(w.OP_TEXT, b"Hello")]


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 125, 126, 127, 2047, 2048, 2049, 65535, 65536, 100_003])
def test_lengths_7_16_64_bit(n):
    payload = os.urandom(n)
    mask = os.urandom(4)
    assert w.FrameDecoder().feed(masked(w.OP_BINARY, payload, mask=mask)) == [(w.OP_BINARY, payload)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 2048, 2051, 4099])
def test_unmask_small_and_numpy_agree_with_bytewise_xor(n):
    payload, mask = os.urandom(n), os.urandom(4)
    assert w.unmask(payload, mask) == bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert w.unmask(w.unmask(payload, mask), mask) == payload


def test_byte_by_byte_and_all_at_once_agree():
    frames = [masked(w.OP_BINARY, b"Q\x00\x00\x00\x0dSELECT 1\x00"), masked(w.OP_PING, b"hi"),
              masked(w.OP_BINARY, b"a" * 300), masked(w.OP_BINARY, b"b" * 70_000), masked(w.OP_PONG, b""),
              masked(w.OP_BINARY, b"x", fin=False), masked(w.OP_CONT, b"y", fin=False), masked(w.OP_CONT, b"z")]
    stream = b"".join(frames)
    expected = [(w.OP_BINARY, b"Q\x00\x00\x00\x0dSELECT 1\x00"), (w.OP_PING, b"hi"), (w.OP_BINARY, b"a" * 300),
                (w.OP_BINARY, b"b" * 70_000), (w.OP_PONG, b""), (w.OP_BINARY, b"xyz")]
    assert w.FrameDecoder().feed(stream) == expected
    dec = w.FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += dec.feed(stream[i:i + 1])
    assert got == expected
    dec = w.FrameDecoder()  # uneven chunks
    got, pos, step = [], 0, 1
    while pos < len(stream):
        got += dec.feed(stream[pos:pos + step])
        pos, step = pos + step, step * 3 % 1031 + 1
    assert got == expected


def test_fragmented_message_with_a_ping_between_fragments():
    dec = w.FrameDecoder()
    assert dec.feed(masked(w.OP_TEXT, b"Hel", fin=False)) == []
    assert dec.feed(masked(w.OP_PING, b"p")) == [(w.OP_PING, b"p")]
    assert dec.feed(masked(w.OP_CONT, b"lo", fin=False) + masked(w.OP_CONT, b"!")) == [(w.OP_TEXT, b"Hello!")]
    assert dec.feed(masked(w.OP_BINARY, b"next")) == [(w.OP_BINARY, b"next")]


def test_close_ends_decoding():
    dec = w.FrameDecoder()
    body = struct.pack("!H", 1001) + "bye ✓".encode()
    out = dec.feed(masked(w.OP_BINARY, b"a") + masked(w.OP_CLOSE, body) + masked(w.OP_BINARY, b"after"))
    assert out == [(w.OP_BINARY, b"a"), (w.OP_CLOSE, body)]
    assert dec.closed and dec.feed(masked(w.OP_BINARY, b"more")) == []
    assert w.parse_close(body) == (1001, "bye ✓")
    assert w.parse_close(b"") == (None, "")
    assert w.FrameDecoder().feed(masked(w.OP_CLOSE, b"")) == [(w.OP_CLOSE, b"")]


def test_max_message_size_is_allowed_exactly():
    dec = w.FrameDecoder(max_message=1000)
    assert dec.feed(masked(w.OP_BINARY, b"m" * 1000)) == [(w.OP_BINARY, b"m" * 1000)]
    assert dec.feed(masked(w.OP_BINARY, b"m" * 600, fin=False) + masked(w.OP_CONT, b"n" * 400)) == [
        (w.OP_BINARY, b"m" * 600 + b"n" * 400)]


def _header_only(op: int, length: int, fin: bool = True) -> bytes:
    return bytes(((0x80 if fin else 0) | op, 0xFF)) + struct.pack("!Q", length) + b"mask"


@pytest.mark.parametrize("data, code, text", [
    (masked(w.OP_BINARY, b"x")[:1] + bytes((1,)) + b"x", 1002, "masked"),  # mask bit clear
    (masked(w.OP_BINARY, b"x", rsv=0x40), 1002, "reserved"),
    (masked(w.OP_BINARY, b"x", rsv=0x10), 1002, "reserved"),
    (masked(0x3, b"x"), 1002, "opcode"),
    (masked(0xB, b"x"), 1002, "opcode"),
    (masked(w.OP_PING, b"x", fin=False), 1002, "fragmented"),
    (masked(w.OP_PING, b"x" * 126), 1002, "125"),
    (masked(w.OP_CONT, b"x"), 1002, "continuation"),
    (masked(w.OP_BINARY, b"x", fin=False) + masked(w.OP_BINARY, b"y"), 1002, "inside a fragmented"),
    (masked(w.OP_BINARY, b"x", fin=False) + masked(w.OP_TEXT, b"y"), 1002, "inside a fragmented"),
    (_header_only(w.OP_BINARY, 1 << 63), 1002, "high bit"),
    (_header_only(w.OP_BINARY, w.MAX_MESSAGE + 1), 1009, "larger"),  # refused from the header alone
    (masked(w.OP_TEXT, b"\xff\xfe"), 1007, "UTF-8"),
    (masked(w.OP_TEXT, "é".encode()[:1], fin=False) + masked(w.OP_CONT, b"!"), 1007, "UTF-8"),
    (masked(w.OP_CLOSE, b"\x03"), 1002, "1-byte"),
    (masked(w.OP_CLOSE, struct.pack("!H", 1005)), 1002, "1005"),
    (masked(w.OP_CLOSE, struct.pack("!H", 999)), 1002, "999"),
    (masked(w.OP_CLOSE, struct.pack("!H", 5000)), 1002, "5000"),
    (masked(w.OP_CLOSE, struct.pack("!H", 1000) + b"\xc3"), 1007, "UTF-8"),
    (b"GET / HTTP/1.1\r\n", 1002, ""),  # garbage after the upgrade
])
def test_protocol_errors(data, code, text):
    with pytest.raises(w.ProtocolError) as e:
        w.FrameDecoder().feed(data)
    assert e.value.code == code and text in e.value.reason


def test_too_big_over_fragments():
    dec = w.FrameDecoder(max_message=1000)
    dec.feed(masked(w.OP_BINARY, b"m" * 600, fin=False))
    with pytest.raises(w.ProtocolError) as e:
        dec.feed(masked(w.OP_CONT, b"n" * 401))
    assert e.value.code == 1009


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999])
def test_valid_close_codes(code):
    assert w.parse_close(struct.pack("!H", code) + b"why") == (code, "why")


# -- server frames -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 125, 126, 65535, 65536, 70_000])
def test_server_frames_round_trip(n):
    payload = os.urandom(n)
    assert server_frames(w.binary_header(n) + payload) == [(w.OP_BINARY, True, payload)]
    assert server_frames(w.frame(w.OP_BINARY, payload)) == [(w.OP_BINARY, True, payload)]
    assert server_frames(w.frame(w.OP_TEXT, payload, fin=False)) == [(w.OP_TEXT, False, payload)]


def test_control_frames():
    assert server_frames(w.frame(w.OP_PONG, b"hi")) == [(w.OP_PONG, True, b"hi")]
    assert server_frames(w.close_frame()) == [(w.OP_CLOSE, True, struct.pack("!H", 1000))]
    op, _fin, body = server_frames(w.close_frame(1002, "x" * 200))[0]
    assert op == w.OP_CLOSE and len(body) == 125 and w.parse_close(body) == (1002, "x" * 123)
