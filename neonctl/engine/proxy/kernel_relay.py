"""The kernel relay: an established session's two sockets joined by an eBPF sockmap, so the proxy no longer
wakes for each message.

The technique is Cilium's. One SOCKHASH map holds both sockets of every relayed session, each stored under
the key its *peer's* bytes carry: a stream-verdict program (BPF_PROG_TYPE_SK_SKB, attached to the map as
BPF_SK_SKB_STREAM_VERDICT) runs for every skb arriving on a socket in the map, looks up the socket cookie
of the skb's owner and redirects the skb out of (egress) the socket stored there. Cookies are unique per
socket for the life of the system, so keys never collide (ports would: a client's ephemeral port can equal
the proxy's own outgoing port, and Unix sockets have none). What the kernel does, found by experiment on
6.18 (tests/unit/test_kernel_relay_program.py repeats it):

- TCP -> Unix redirection works both ways, so the compute is still reached over its Unix socket.
- A TCP skb belongs to the socket that received it, so the client's socket is keyed by its own cookie
  (SO_COOKIE). An AF_UNIX skb still belongs to the socket that *sent* it - the backend's end, in another
  process - so the compute side is keyed by that socket's cookie, which sock_diag (unix_diag) reports.
- Egress redirection goes through the target socket's backlog worker (a kworker wake-up per message);
  the proxy itself does no work per message.
- Redirected data never reaches the socket's receive queue, so poll reports no EPOLLIN for it, while the
  peer's FIN or RST still shows as EPOLLRDHUP (EPOLLHUP, EPOLLERR). The relay watches each relayed socket
  in an epoll set of its own for EPOLLRDHUP only (HUP and ERR are always reported): a wake-up carrying
  EPOLLIN, which the kernel still sends when data is redirected, does not match it and wakes no one.

The program is assembled by hand and loaded through `bpf.py`. Where the machine allows it, a session goes
one step further: the socket shortcut (`shortcut.py`) joins the client's and the backend's own sockets, so
its bytes skip both of the proxy's sockets; a session it cannot take (a client that is not on this
machine's loopback, a pooled session reaching PgBouncer over its Unix socket) is relayed as above. Both
ways share the hand-off and the hang-up watch below.

The hand-off (`KernelRelay.join`) must not lose or reorder a byte, so it happens only when both directions
are quiescent: the proxy holds the compute's ReadyForQuery from start-up, has not sent it, and has nothing
buffered - the client waits for ReadyForQuery before it sends, and the backend sends nothing unasked. Both
sockets go into the map and only then is ReadyForQuery written. When one side ends, both leave the map and
are closed, as with the userspace relay, so a backend never outlives its client.

`open_kernel_relay()` returns None - with one log line - wherever this cannot work (another architecture,
no CAP_BPF/CAP_NET_ADMIN, an older kernel) or when NEONCTL_PROXY_KERNEL_RELAY=0: the proxy then relays in
userspace (`link.splice`), as it does for WebSocket sessions always. NEONCTL_PROXY_KERNEL_RELAY=sockmap
keeps the relay without the shortcut (for comparisons).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import sys
import termios

from neonctl.engine.proxy.bpf import (
    BPF_MAP_TYPE_SOCKHASH,
    BPF_PROG_TYPE_SK_SKB,
    BPF_SK_SKB_STREAM_VERDICT,
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R10,
    SK_PASS,
    Bpf,
    BPF_FUNC_get_socket_cookie,
    BPF_FUNC_sk_redirect_hash,
    add64_imm,
    call,
    exit_,
    load_map_fd,
    mov64_imm,
    mov64_reg,
    store64,
)
from neonctl.engine.proxy.shortcut import Shortcut, open_shortcut

log = logging.getLogger("proxy.kernel_relay")

ENV_SWITCH = "NEONCTL_PROXY_KERNEL_RELAY"  # "0": the userspace relay; "sockmap": no socket shortcut
SO_COOKIE = 57  # getsockopt(SOL_SOCKET): the socket's 64-bit cookie, the key the program looks up
MAX_SESSIONS = 65536  # sockets in the map: two per relayed session


def verdict_program(map_fd: int) -> bytes:
    """For each skb: redirect it out of the socket stored under this socket's cookie; pass it if none.

    Returning SK_PASS whatever the helper said keeps a failed lookup harmless: the bytes land in the
    socket's own receive queue (the kernel still redirects when the helper recorded a target).
    """
    return b"".join([
        mov64_reg(R6, R1),                     # r6 = ctx (struct __sk_buff *)
        call(BPF_FUNC_get_socket_cookie),      # r0 = cookie of the receiving socket
        store64(R10, -8, R0),                  # key on the stack: *(u64 *)(fp - 8) = r0
        mov64_reg(R1, R6),                     # r1 = ctx
        load_map_fd(R2, map_fd),               # r2 = the SOCKHASH
        mov64_reg(R3, R10),
        add64_imm(R3, -8),                     # r3 = &key
        mov64_imm(R4, 0),                      # r4 = flags: 0 = egress of the target socket
        call(BPF_FUNC_sk_redirect_hash),
        mov64_imm(R0, SK_PASS),
        exit_(),
    ])


# -- which cookie the program sees for a socket -------------------------------------------------------------
# The program looks up the cookie of the skb's owner. A TCP skb in a receive queue belongs to the receiving
# socket; an AF_UNIX skb still belongs to the socket that *sent* it, i.e. the peer end (here: the backend's
# end of the compute's Unix socket, in another process). Its cookie comes from sock_diag (unix_diag), which
# reports a Unix socket's peer inode and, asked by inode, that socket's cookie.

NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, NLMSG_ERROR = 4, 20, 2
UDIAG_SHOW_PEER, UNIX_DIAG_PEER = 0x04, 2
_NO_COOKIE = 0xFFFFFFFF


def _unix_diag(ino: int, show: int) -> tuple[int, dict[int, bytes]]:
    """(cookie, attributes) of the Unix socket with inode `ino`."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        req = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino, show, _NO_COOKIE, _NO_COOKIE)
        nl.send(struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, 1, 1, 0) + req)  # NLM_F_REQUEST
        data = nl.recv(8192)
    length, kind = struct.unpack_from("=IH", data)
    if kind == NLMSG_ERROR:
        e = -struct.unpack_from("=i", data, 16)[0]
        raise OSError(e, f"unix_diag of inode {ino}: {os.strerror(e)}")
    _f, _t, _s, _p, _ino, lo, hi = struct.unpack_from("=BBBBIII", data, 16)
    attrs, off = {}, 32
    while off + 4 <= length:
        alen, atype = struct.unpack_from("=HH", data, off)
        attrs[atype] = data[off + 4: off + alen]
        off += (alen + 3) & ~3
    return lo | (hi << 32), attrs


def redirect_key(sock) -> int:
    """The key under which the map must hold the peer of `sock`: the cookie of the owner of its skbs."""
    if sock.family == socket.AF_UNIX:
        _, attrs = _unix_diag(os.fstat(sock.fileno()).st_ino, UDIAG_SHOW_PEER)
        if UNIX_DIAG_PEER not in attrs:
            raise OSError(errno.ENOTCONN, "the Unix socket has no peer")
        return _unix_diag(struct.unpack("=I", attrs[UNIX_DIAG_PEER])[0], 0)[0]
    return struct.unpack("<Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def queued(fd: int) -> int:
    """Bytes waiting in a socket's receive queue (SIOCINQ)."""
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


# -- sessions -------------------------------------------------------------------------------------------------

GRACE = 0.05  # after one side ends, time for bytes the kernel still holds for the other to go out


class _Pair:
    """One relayed session: its two Links, the relay's own (client, server) sockets, how to undo the join
    (the sockhash keys of the sk_skb relay, or the shortcut's route keys)."""

    __slots__ = ("client", "server", "socks", "keys", "routes", "ended")

    def __init__(self, client, server, socks, keys, routes):
        self.client, self.server, self.socks, self.keys, self.routes = client, server, socks, keys, routes
        self.ended = False


class KernelRelay:
    """The map, the program, the shortcut if any, and the watch on relayed sockets; one per proxy process."""

    def __init__(self, shortcut: bool = True) -> None:
        self.bpf = Bpf()
        self.map_fd = self.bpf.create_map(BPF_MAP_TYPE_SOCKHASH, 8, 4, MAX_SESSIONS, "the sockhash")
        try:
            self.prog_fd = self.bpf.load(BPF_PROG_TYPE_SK_SKB, verdict_program(self.map_fd), b"neonctl_relay")
            self.bpf.attach(self.map_fd, self.prog_fd, BPF_SK_SKB_STREAM_VERDICT, "attach the verdict program")
        except BaseException:
            os.close(self.map_fd)
            raise
        self.shortcut: Shortcut | None = open_shortcut(self.bpf) if shortcut else None
        self.epoll = select.epoll()
        self.pairs: dict[int, _Pair] = {}  # watched fd -> its session
        self.joined = 0  # sessions relayed by the kernel since start (reported by /v1/status)
        self._loop: asyncio.AbstractEventLoop | None = None

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.epoll.fileno())
        self.epoll.close()
        if self.shortcut is not None:
            self.shortcut.close()
        os.close(self.prog_fd)
        os.close(self.map_fd)

    def adopt(self, link) -> None:
        """A new client session: from now on the proxy's writes to it take the shortcut as well (so that
        a later `join` keeps the order of everything the client reads); nothing where that cannot be."""
        sock = link.transport.get_extra_info("socket") if link.transport is not None else None
        if self.shortcut is None or sock is None or sock.family != socket.AF_INET:
            return
        try:
            key = self.shortcut.adopt(sock)
        except OSError as e:
            log.info("client not adopted by the socket shortcut: %s", e)
            return
        if key is not None:
            link.on_close(lambda: self.shortcut.part((key,)))

    def frame_backend(self, client, server) -> bool:
        """A WebSocket session: the backend's sends go straight to the client, each as one binary frame
        (`shortcut.py`); the client's masked frames still come through the proxy. False where the shortcut
        cannot take the session (the caller relays both ways in userspace)."""
        socks = (client.transport.get_extra_info("socket"), server.transport.get_extra_info("socket"))
        if self.shortcut is None or None in socks or server.buf or socks[1].family != socket.AF_INET:
            return False
        try:
            routes = self.shortcut.join(socks[0], socks[1], ws=True)
        except OSError as e:
            log.info("WebSocket session relayed in userspace: %s", e)
            return False
        server.on_close(lambda: self.shortcut.part(routes))
        return True

    def listening(self, addr: tuple[str, int]) -> None:
        """The proxy accepts clients at addr: their sockets may take the shortcut."""
        if self.shortcut is not None:
            self.shortcut.watch_remote(addr)

    def active(self) -> int:
        return len(self.pairs) // 2

    def _update(self, key: int, fd: int) -> None:
        self.bpf.update(self.map_fd, struct.pack("<Q", key), struct.pack("<I", fd), "add a socket to the sockhash")

    def _delete(self, key: int) -> None:
        self.bpf.delete(self.map_fd, struct.pack("<Q", key), "remove a socket from the sockhash")

    # -- a session's life ----------------------------------------------------------------------------

    def join(self, client, server, first: bytes) -> bool:
        """Relay between two `Link`s in the kernel from now on, then send the client `first` (the start-up
        messages ending in ReadyForQuery). False - nothing changed, `first` not sent - if the session is
        not quiescent or the kernel refuses; the caller then relays in userspace."""
        if client.closed or server.closed or client.buf or server.buf:
            return False
        if client.transport.get_write_buffer_size() or server.transport.get_write_buffer_size():
            return False
        socks = (client.transport.get_extra_info("socket"), server.transport.get_extra_info("socket"))
        if None in socks or socks[0].family != socket.AF_INET:
            return False
        fds = (socks[0].fileno(), socks[1].fileno())
        client.transport.pause_reading()
        server.transport.pause_reading()
        keys: list[int] = []
        routes: tuple[bytes, ...] = ()
        try:
            if queued(fds[0]) or queued(fds[1]):
                raise OSError(errno.EBUSY, "bytes are waiting in a socket")
            routes = self._shortcut(socks)
            if not routes:
                wanted = (redirect_key(socks[0]), redirect_key(socks[1]))
                for key, peer_fd in zip(wanted, reversed(fds), strict=True):
                    self._update(key, peer_fd)
                    keys.append(key)
            # Bytes that got into a queue before the program watched it would wait there for the next
            # skb; none can (both sides wait for each other), but a client that pipelines before
            # ReadyForQuery could: such a session stays in userspace.
            if queued(fds[0]) or queued(fds[1]):
                raise OSError(errno.EBUSY, "bytes arrived during the hand-off")
        except OSError as e:
            for key in keys:
                self._delete(key)
            if routes:
                self.shortcut.part(routes)
            client.transport.resume_reading()
            server.transport.resume_reading()
            log.warning("session relayed in userspace: %s", e)
            return False
        # The event loop must not poll the sockets any more: the kernel still wakes a socket's waiters
        # when it redirects data (EPOLLIN that then finds nothing), which would wake the proxy per message.
        pair = _Pair(client, server, (client.hand_over(), server.hand_over()), tuple(keys), routes)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self.epoll.fileno(), self._hangups)
        for sock in pair.socks:
            self.pairs[sock.fileno()] = pair
            self.epoll.register(sock.fileno(), select.EPOLLRDHUP)  # HUP and ERR come anyway; data does not
        self.joined += 1
        try:
            pair.socks[0].settimeout(10)  # a few hundred bytes into an empty send buffer: no wait in practice
            pair.socks[0].sendall(first)
        except OSError:
            self._end(pair)
        return True

    def _shortcut(self, socks) -> tuple[bytes, ...]:
        """Join the session's two ends through the socket shortcut; () where it cannot take the session."""
        if self.shortcut is None or socks[1].family != socket.AF_INET:
            return ()
        try:
            return self.shortcut.join(socks[0], socks[1])
        except OSError as e:
            log.info("session relayed without the socket shortcut: %s", e)
            return ()

    def _hangups(self) -> None:
        for fd, _events in self.epoll.poll(0):
            pair = self.pairs.get(fd)
            if pair is not None:
                self._end(pair)

    def _end(self, pair: _Pair) -> None:
        """One side closed: stop watching now; after GRACE take both out of the map and close both."""
        if pair.ended:
            return
        pair.ended = True
        for sock in pair.socks:
            if self.pairs.pop(sock.fileno(), None) is not None:
                self.epoll.unregister(sock.fileno())
        if pair.routes:  # the shortcut holds no bytes in flight: its routes go now, before a 4-tuple can recur
            self.shortcut.part(pair.routes)

        def finish() -> None:
            for key in pair.keys:
                self._delete(key)
            for sock in pair.socks:
                sock.close()
            pair.client.released()
            pair.server.released()

        self._loop.call_later(GRACE, finish)


def open_kernel_relay() -> KernelRelay | None:
    """The kernel relay if this process can have one; None (and why, in one log line) if not."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        log.info("kernel relay off (%s=0): relaying in userspace", ENV_SWITCH)
        return None
    try:
        relay = KernelRelay(shortcut=os.environ.get(ENV_SWITCH) != "sockmap")
    except OSError as e:
        log.info("kernel relay unavailable (%s): relaying in userspace", e.strerror or e)
        return None
    log.info("kernel relay on: established sessions are relayed by an eBPF sockmap%s",
             ", client and backend sockets joined directly where they can be" if relay.shortcut else "")
    return relay
