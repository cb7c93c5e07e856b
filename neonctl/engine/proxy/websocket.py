"""The Postgres protocol over a WebSocket, for the serverless driver's `Pool` and `Client`.

Runtimes without TCP (edge functions, browsers) carry the protocol in binary WebSocket frames; Neon's
proxy accepts them at `/v2` (the driver's default `host + '/v2'`) and at `/v1?address=host:port` (the
form a string `wsProxy` produces). Here the frames feed the same `relay.Session` as a TCP client: the
same authentication, routing, wake-up and cancel keys. The `address` is not used for routing (one proxy
serves one project; the branch comes from `endpoint=`), so nothing a client sends names a host to reach.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSMsgType, web

from neonctl.engine.proxy.link import Link
from neonctl.engine.proxy.relay import Session

log = logging.getLogger("proxy.ws")


class WsLink(Link):
    """A Link whose bytes travel in WebSocket binary frames, written straight to the socket.

    A server's frames are not masked, so a frame is a 2-10 byte header and the bytes as they came from the
    compute: each reply goes out from the compute socket's callback with one transport write - no queue, no
    sender task, no await per message (what the driver's Pool latency is made of).
    """

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport):
        super().__init__()
        self.ws = ws
        self.transport = transport

    def write(self, data: bytes) -> None:
        if not self.closed and not self.transport.is_closing():
            n = len(data)
            if n < 126:
                header = bytes((0x82, n))
            elif n < 1 << 16:
                header = b"\x82\x7e" + n.to_bytes(2, "big")
            else:
                header = b"\x82\x7f" + n.to_bytes(8, "big")
            self.transport.writelines((header, data))

    def close(self) -> None:
        if not self.closed:
            self.connection_lost(None)
            asyncio.get_running_loop().create_task(self.ws.close())


async def handle(request: web.Request, make_session) -> web.WebSocketResponse:
    # no permessage-deflate: Postgres messages are small and latency is the point
    ws = web.WebSocketResponse(max_msg_size=16 * 1024 * 1024, compress=False)
    await ws.prepare(request)
    link = WsLink(ws, request.transport)
    session: Session = make_session(link)
    task = asyncio.get_running_loop().create_task(session.run())
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                link.data_received(msg.data)
            elif msg.type == WSMsgType.TEXT:  # the protocol is binary; text is a client bug
                link.data_received(msg.data.encode())
            else:
                break
    finally:
        link.close()
        await asyncio.wait([task], timeout=5)
    return ws
