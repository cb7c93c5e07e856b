"""The Postgres protocol over a WebSocket, for the serverless driver's `Pool` and `Client`.

Runtimes without TCP (edge functions, browsers) carry the protocol in binary WebSocket frames; Neon's
proxy accepts them at `/v2` (the driver's default `host + '/v2'`) and at `/v1?address=host:port` (the
form a string `wsProxy` produces). Here they arrive on the proxy's WebSocket port, where each accepted
socket is a `WsLink`: an asyncio protocol that answers the HTTP upgrade itself and then feeds the
unframed bytes to the same `relay.Session` as a TCP client (the same authentication, routing, wake-up and
cancel keys). The `address` is not used for routing (one proxy serves one project; the branch comes from
`endpoint=`), so nothing a client sends names a host to reach.

No HTTP server sits under it: a query is the same two event-loop callbacks as through the TCP relay (the
client's frame is unmasked and written to the compute's socket from `data_received`; the compute's reply
goes out as one frame from its socket's callback), with no task, queue or await in between. The framing
rules are in `ws_frames.py`; a client that breaks them gets a close frame with the RFC's code and only
its own connection ends.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from neonctl.engine.proxy import ws_frames
from neonctl.engine.proxy.link import Link
from neonctl.engine.proxy.ws_frames import OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT

log = logging.getLogger("proxy.ws")
PATHS = ("/v2", "/v1", "/")  # the driver's default `host + '/v2'`; `/v1?address=` for a string wsProxy
UPGRADE_TIMEOUT = 10.0  # a connection that has not finished its HTTP upgrade by then is closed


class WsLink(Link):
    """One WebSocket client: the HTTP upgrade, then a Link whose bytes travel in binary frames.

    `start(link)` is called once the upgrade is answered (it starts the link's `relay.Session`). A server's
    frames are not masked, so `write` puts a 2-10 byte header before the bytes as they came from the
    compute and makes one transport write of it.
    """

    raw = False  # the bytes travel in frames: always relayed in userspace

    def __init__(self, start: Callable[[WsLink], None]):
        super().__init__()
        self._start = start
        self._head: bytearray | None = bytearray()  # the HTTP request until it is answered
        self._frames = ws_frames.FrameDecoder()
        self._timer: asyncio.TimerHandle | None = None
        self._close_sent = False

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:  # a reply is one small write: never hold it back for an ACK
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._timer = asyncio.get_running_loop().call_later(UPGRADE_TIMEOUT, self._upgrade_timeout)

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            self._upgrade(data)
            return
        try:
            events = self._frames.feed(data)
        except ws_frames.ProtocolError as e:
            log.info("closing a WebSocket (%d): %s", e.code, e.reason)
            self._close_with(e.code, e.reason)
            return
        if len(events) == 1 and events[0][0] == OP_BINARY:  # the usual case: one frame, one Postgres message
            Link.data_received(self, events[0][1])
            return
        batch: list[bytes] = []  # consecutive messages reach the compute in one write
        for op, payload in events:
            if op in (OP_BINARY, OP_TEXT):  # the protocol is binary; text is a client's bug, passed on
                batch.append(payload)
                continue
            if batch:
                Link.data_received(self, b"".join(batch))
                batch = []
            if op == OP_PING:
                self._send(ws_frames.frame(ws_frames.OP_PONG, payload))
            elif op == OP_CLOSE:  # echo its code, then close the socket (the server closes TCP first)
                code, _reason = ws_frames.parse_close(payload)
                self._close_with(code or ws_frames.CLOSE_NORMAL)
                return
            # a pong needs nothing
        if batch:
            Link.data_received(self, b"".join(batch))

    def connection_lost(self, exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    # -- the upgrade -------------------------------------------------------------------------------

    def _upgrade(self, data: bytes) -> None:
        self._head += data
        try:
            parsed = ws_frames.parse_request(self._head)
            if parsed is None:
                return
            request, used = parsed
            answer = ws_frames.accept(request, PATHS)
        except ws_frames.HandshakeError as e:
            self._head = None
            self.transport.write(e.response())
            self.transport.close()
            return
        rest = bytes(self._head[used:])
        self._head = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport.write(answer)
        self._start(self)
        if rest:  # frames sent right behind the request
            self.data_received(rest)

    def _upgrade_timeout(self) -> None:
        self._timer = None
        if self._head is not None and not self.closed:
            self._head = None
            self.transport.write(ws_frames.HandshakeError(408, "the WebSocket upgrade took too long").response())
            self.transport.close()

    # -- writing -----------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if not self.closed and not self._close_sent and not self.transport.is_closing():
            self.transport.write(data)

    def _close_with(self, code: int, reason: str = "") -> None:
        self._send(ws_frames.close_frame(code, reason))
        self._close_sent = True
        self.transport.close()

    def write(self, data: bytes) -> None:
        if not self.closed and not self._close_sent and not self.transport.is_closing():
            n = len(data)
            if n < 1 << 16:
                self.transport.write(ws_frames.binary_header(n) + data)
            else:  # no copy of a long reply
                self.transport.writelines((ws_frames.binary_header(n), data))

    def close(self) -> None:
        """End the WebSocket (the session is over): a normal close frame, then the socket."""
        if self.transport is not None and not self.closed:
            if self._head is None:
                self._close_with(ws_frames.CLOSE_NORMAL)
            else:
                self.transport.close()
