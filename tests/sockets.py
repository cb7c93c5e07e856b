"""Socket helpers shared by the proxy's relay tests: a Link that reports its connection, exact reads."""

from __future__ import annotations

from neonctl.engine.proxy.link import Link


def accepting_link(fut) -> Link:
    """A Link for a server's protocol factory that resolves `fut` with itself once connected."""
    link = Link()
    orig = link.connection_made

    def made(transport):
        orig(transport)
        if not fut.done():
            fut.set_result(link)

    link.connection_made = made
    return link


def recv_exactly(sock, n: int) -> bytes:
    """n bytes from a blocking socket; fails on EOF before them."""
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)
