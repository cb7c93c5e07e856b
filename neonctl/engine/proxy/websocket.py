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
    """A Link whose bytes travel in WebSocket binary frames; writes are queued to one sender task."""

    def __init__(self, ws: web.WebSocketResponse):
        super().__init__()
        self.ws = ws
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        try:
            while True:
                data = await self._out.get()
                if data is None:
                    break
                await self.ws.send_bytes(data)
        except (ConnectionError, RuntimeError):
            pass
        finally:
            if not self.ws.closed:
                await self.ws.close()

    def write(self, data: bytes) -> None:
        if not self.closed:
            self._out.put_nowait(data)

    def close(self) -> None:
        if not self.closed:
            self._out.put_nowait(None)
            self.connection_lost(None)


async def handle(request: web.Request, make_session) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=16 * 1024 * 1024)
    await ws.prepare(request)
    link = WsLink(ws)
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
