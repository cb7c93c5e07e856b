"""A socket as the proxy uses it: awaited reads during the handshake, then a direct relay to its peer.

During start-up and authentication the proxy reads messages one at a time (`read_more`); once a session is
established the two links are spliced: each chunk a socket delivers is written straight into the other
socket's transport from the protocol callback, with no task, queue or copy in between, and with flow
control (a peer that cannot keep up pauses reading on this side). That keeps the per-query cost of the
proxy to two event-loop callbacks. Bytes that arrived before the splice (a pipelining client) are
forwarded first.
"""

from __future__ import annotations

import asyncio


class Link(asyncio.Protocol):
    raw = True  # the socket carries the Postgres protocol as is (so the kernel may relay it: kernel_relay.py)

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.peer: Link | None = None
        self.closed = False
        self._waiter: asyncio.Future | None = None
        self._on_close: list = []
        self._handed_over = False  # the socket now belongs to the kernel relay (`hand_over`)

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.write(data)
            return
        self.buf += data
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc) -> None:
        if self._handed_over:
            return  # our transport let go of the socket; the new owner calls `released`
        self.released()

    def released(self) -> None:
        """The connection is over: wake a reader, close the peer, run the on_close callbacks."""
        self.closed = True
        self._wake()
        if self.peer is not None and not self.peer.closed:
            self.peer.close()
        for cb in self._on_close:
            cb()
        self._on_close.clear()

    def pause_writing(self) -> None:  # our socket's buffer is full: stop taking bytes from the peer
        if self.peer is not None and not self.peer.closed and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.closed and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    # -- handshake ---------------------------------------------------------------------------------

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def read_more(self, timeout: float) -> None:
        """Wait until more bytes arrived in `buf`; ConnectionError if the socket closed first."""
        if self.closed:
            raise ConnectionError("connection closed")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._waiter, timeout)
        finally:
            self._waiter = None
        if self.closed and not self.buf:
            raise ConnectionError("connection closed")

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def on_close(self, cb) -> None:
        if self.closed:
            cb()
        else:
            self._on_close.append(cb)

    # -- relay -------------------------------------------------------------------------------------

    def hand_over(self):
        """Give the socket to a new owner (the kernel relay): returns a duplicate of it and closes the
        transport, which takes the socket out of the event loop's poll set without ending the connection.
        The link stays open until the new owner calls `released()`."""
        sock = self.transport.get_extra_info("socket").dup()
        self._handed_over = True
        self.transport.abort()
        return sock

    def splice(self, peer: Link) -> None:
        """From now on every byte from this socket goes to `peer` (what already arrived first)."""
        self.peer = peer
        if self.buf:
            peer.write(bytes(self.buf))
            self.buf.clear()
        if self.closed:
            peer.close()


def splice(a: Link, b: Link) -> None:
    """Relay both ways between two established links until either closes (then both are closed)."""
    a.splice(b)
    b.splice(a)
