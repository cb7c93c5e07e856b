"""The socket shortcut: an established session's client and backend sockets joined to each other, so its
bytes skip the proxy's two sockets and both TCP hops.

The sk_skb relay (`kernel_relay.py`) keeps the proxy's own two sockets in the path: every message crosses
loopback TCP twice and a kworker once. Here the two *ends* - the client's socket in its process and the
backend's socket in the compute - send to each other directly, Cilium's socket-level redirect:

- A sock_ops program, linked to the root of the cgroup v2 hierarchy, sees every TCP connection become
  established. It adds to a SOCKHASH, under the socket's own 4-tuple, only the sockets whose remote end
  is a watched address: the proxy's listener (a client's socket) and the local address of a socket the
  proxy is about to connect to a compute (the backend's socket). Nothing else on the machine is touched.
- An sk_msg program on that SOCKHASH runs when such a socket sends. It looks the sender's 4-tuple up in a
  route map the proxy fills when it joins a session, and redirects the message into the receive queue
  (BPF_F_INGRESS) of the socket stored under the route's target: no TCP, no skb, no kworker, in the
  sender's own system call. A sender without a route (any session before its join) sends as usual.

- A client reads the shortcut's queue before its TCP one, so a reply must never land there while bytes
  the proxy wrote earlier (the start-up, ReadyForQuery) still wait in TCP: from a session's first byte
  the proxy's own socket is in the map too, with a route into its client (`adopt`).
- A WebSocket session (the serverless driver) routes one way only: each of the backend's sends becomes
  one binary frame - the program pushes the 2-10 byte header in front of the message and writes it in
  place - while the client's masked frames still come through the proxy, which unmasks them.

So a joined session costs less than the same client connected to the compute directly. The proxy still
holds its two sockets, and learns from them when either side closes: closing goes through TCP as usual.
The link is a file descriptor of the proxy process, so the programs go away with the proxy, whatever ends
it. Where any piece is missing (no cgroup v2, an older kernel) `open_shortcut` returns None and the
sk_skb relay carries sessions alone.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from pathlib import Path

from neonctl.engine.proxy.bpf import (
    BPF_ANY,
    BPF_CGROUP_SOCK_OPS,
    BPF_F_INGRESS,
    BPF_MAP_TYPE_HASH,
    BPF_MAP_TYPE_SOCKHASH,
    BPF_PROG_TYPE_SK_MSG,
    BPF_PROG_TYPE_SOCK_OPS,
    BPF_SK_MSG_VERDICT,
    R0,
    R1,
    R2,
    R3,
    R4,
    R5,
    R6,
    R8,
    R9,
    R10,
    SK_DROP,
    SK_PASS,
    Bpf,
    BPF_FUNC_map_lookup_elem,
    BPF_FUNC_msg_pull_data,
    BPF_FUNC_msg_push_data,
    BPF_FUNC_msg_redirect_hash,
    BPF_FUNC_sock_hash_update,
    BpfError,
    Jump,
    add64_imm,
    assemble,
    call,
    exit_,
    load32,
    load64,
    load_map_fd,
    mov64_imm,
    mov64_reg,
    rsh64_imm,
    store8,
    store32,
    store64,
)

log = logging.getLogger("proxy.shortcut")

MAX_SOCKETS = 65536
MAX_WATCHED = 4096  # the listener and the compute connections being set up

# struct bpf_sock_ops and struct sk_msg_md (include/uapi/linux/bpf.h): the fields the programs read. Both
# keep an address in network order and a local port in host order; the remote port is the network-order
# 16 bits shifted into the upper half (the `<< 16` the kernel's context rewrite does on little-endian).
OPS_OP, OPS_FAMILY, OPS_REMOTE_IP4, OPS_LOCAL_IP4, OPS_REMOTE_PORT, OPS_LOCAL_PORT = 0, 20, 24, 28, 64, 68
MSG_DATA, MSG_DATA_END, MSG_REMOTE_IP4, MSG_LOCAL_IP4 = 0, 8, 20, 24
MSG_REMOTE_PORT, MSG_LOCAL_PORT, MSG_SIZE = 60, 64, 68
BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB = 4, 5


def watch_key(addr: tuple[str, int]) -> bytes:
    """The watch map's key for a remote address: (remote_ip4, remote_port) as the sock_ops context has them."""
    return socket.inet_aton(addr[0]) + struct.pack("<I", socket.htons(addr[1]) << 16)


def tuple_key(local: tuple[str, int], remote: tuple[str, int]) -> bytes:
    """A socket's key in the SOCKHASH and the route map: local ip, remote ip, local port, remote port."""
    return (socket.inet_aton(local[0]) + socket.inet_aton(remote[0])
            + struct.pack("<II", local[1], socket.htons(remote[1]) << 16))


def sock_ops_program(socks_fd: int, watch_fd: int) -> bytes:
    """On ACTIVE/PASSIVE_ESTABLISHED of an IPv4 socket whose remote end is watched: socks[4-tuple] = it."""
    return assemble(
        mov64_reg(R6, R1),                                        # r6 = ctx (struct bpf_sock_ops *)
        load32(R2, R6, OPS_OP),
        Jump(R2, "==", BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, "established"),
        Jump(R2, "!=", BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, "out"),
        "established",
        load32(R2, R6, OPS_FAMILY),
        Jump(R2, "!=", socket.AF_INET, "out"),
        load32(R2, R6, OPS_REMOTE_IP4), store32(R10, -24, R2),    # watch key at fp-24: remote ip, port
        load32(R2, R6, OPS_REMOTE_PORT), store32(R10, -20, R2),
        load_map_fd(R1, watch_fd), mov64_reg(R2, R10), add64_imm(R2, -24),
        call(BPF_FUNC_map_lookup_elem),
        Jump(R0, "==", 0, "out"),
        load32(R2, R6, OPS_LOCAL_IP4), store32(R10, -16, R2),     # the 4-tuple at fp-16
        load32(R2, R6, OPS_REMOTE_IP4), store32(R10, -12, R2),
        load32(R2, R6, OPS_LOCAL_PORT), store32(R10, -8, R2),
        load32(R2, R6, OPS_REMOTE_PORT), store32(R10, -4, R2),
        mov64_reg(R1, R6), load_map_fd(R2, socks_fd), mov64_reg(R3, R10), add64_imm(R3, -16),
        mov64_imm(R4, BPF_ANY),
        call(BPF_FUNC_sock_hash_update),
        "out",
        mov64_imm(R0, 1),
        exit_(),
    )


ROUTE_PLAIN, ROUTE_WS_FRAMES = 0, 1  # a route's flags: bytes as they are; each send as one WebSocket frame
ROUTE_VALUE = struct.Struct("<16sI4x")  # the target's key, the flags


def _ws_header(size_reg: int, length: int, label: str) -> list:
    """Push a server frame's header (FIN + binary, unmasked) of `length` bytes in front of the message and
    write it: 2 bytes for payloads under 126, 4 under 65536, else 10 (RFC 6455 5.2)."""
    out = [
        mov64_reg(R1, R6), mov64_imm(R2, 0), mov64_imm(R3, length), mov64_imm(R4, 0),
        call(BPF_FUNC_msg_push_data), Jump(R0, "!=", 0, "drop"),
        mov64_reg(R1, R6), mov64_imm(R2, 0), mov64_imm(R3, length), mov64_imm(R4, 0),
        call(BPF_FUNC_msg_pull_data), Jump(R0, "!=", 0, "drop"),   # the header bytes, linear and writable
        load64(R2, R6, MSG_DATA), load64(R3, R6, MSG_DATA_END),
        mov64_reg(R4, R2), add64_imm(R4, length), Jump(R4, ">", 0, "drop", src=R3),  # the verifier's bound
        mov64_imm(R5, 0x82), store8(R2, 0, R5),
    ]
    if length == 2:
        out += [store8(R2, 1, size_reg)]
    else:
        n = 2 if length == 4 else 8
        out += [mov64_imm(R5, 126 if length == 4 else 127), store8(R2, 1, R5)]
        for k in range(n):  # the length, big-endian; a message is far below 2**32 bytes: the top ones are 0
            shift = 8 * (n - 1 - k)
            if shift >= 32:
                out += [mov64_imm(R5, 0)]
            else:
                out += [mov64_reg(R5, size_reg), rsh64_imm(R5, shift)]
            out += [store8(R2, 2 + k, R5)]
    return [*out, Jump.always(label)]


def msg_program(socks_fd: int, routes_fd: int) -> bytes:
    """On a send: if the sender's 4-tuple has a route, into the receive queue of the socket it names,
    framed as one WebSocket binary frame where the route says so.

    A plain route answers SK_PASS whatever the helper said: a route whose target has closed lets the bytes
    go the usual way (to the proxy's socket, which is closing the session anyway). A framing route answers
    SK_DROP where it cannot frame or deliver: the backend's send then fails and the session ends, where
    letting the bytes through would hand the proxy a frame it would frame again."""
    return assemble(
        mov64_reg(R6, R1),                                        # r6 = ctx (struct sk_msg_md *)
        load32(R2, R6, MSG_LOCAL_IP4), store32(R10, -16, R2),     # the sender's 4-tuple at fp-16
        load32(R2, R6, MSG_REMOTE_IP4), store32(R10, -12, R2),
        load32(R2, R6, MSG_LOCAL_PORT), store32(R10, -8, R2),
        load32(R2, R6, MSG_REMOTE_PORT), store32(R10, -4, R2),
        load_map_fd(R1, routes_fd), mov64_reg(R2, R10), add64_imm(R2, -16),
        call(BPF_FUNC_map_lookup_elem),
        Jump(R0, "==", 0, "pass"),
        load64(R2, R0, 0), store64(R10, -32, R2),                 # the target's key at fp-32
        load64(R2, R0, 8), store64(R10, -24, R2),
        load32(R8, R0, 16),                                       # r8 = the route's flags
        Jump(R8, "==", ROUTE_PLAIN, "redirect"),
        load32(R9, R6, MSG_SIZE),                                 # r9 = the message's size
        Jump(R9, ">", 125, "medium"),
        *_ws_header(R9, 2, "redirect"),
        "medium",
        Jump(R9, ">", 65535, "large"),
        *_ws_header(R9, 4, "redirect"),
        "large",
        *_ws_header(R9, 10, "redirect"),
        "redirect",
        mov64_reg(R1, R6), load_map_fd(R2, socks_fd), mov64_reg(R3, R10), add64_imm(R3, -32),
        mov64_imm(R4, BPF_F_INGRESS),
        call(BPF_FUNC_msg_redirect_hash),
        Jump(R8, "==", ROUTE_PLAIN, "pass"),
        exit_(),                                                  # framed: the helper's SK_PASS or SK_DROP
        "drop",
        mov64_imm(R0, SK_DROP),
        exit_(),
        "pass",
        mov64_imm(R0, SK_PASS),
        exit_(),
    )


def cgroup2_root() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (its root: every process on the machine is below it)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            fields = left.split()
            if fields[3] == "/":  # the mount shows the hierarchy's root, not a subtree of it
                return Path(fields[4])
    return None


class Shortcut:
    """The maps, the two programs and the cgroup link; one per proxy process."""

    def __init__(self, bpf: Bpf, cgroup: Path):
        self.bpf = bpf
        self.fds: list[int] = []
        try:
            self.socks = self._fd(bpf.create_map(BPF_MAP_TYPE_SOCKHASH, 16, 8, MAX_SOCKETS, "the shortcut's sockhash"))
            self.routes = self._fd(bpf.create_map(BPF_MAP_TYPE_HASH, 16, ROUTE_VALUE.size, MAX_SOCKETS,
                                                  "the route map"))
            self.watch = self._fd(bpf.create_map(BPF_MAP_TYPE_HASH, 8, 4, MAX_WATCHED, "the watch map"))
            msg = self._fd(bpf.load(BPF_PROG_TYPE_SK_MSG, msg_program(self.socks, self.routes), b"neonctl_msg"))
            bpf.attach(self.socks, msg, BPF_SK_MSG_VERDICT, "attach the sk_msg program")
            ops = self._fd(bpf.load(BPF_PROG_TYPE_SOCK_OPS, sock_ops_program(self.socks, self.watch),
                                    b"neonctl_sockops"))
            cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                self._fd(bpf.link(ops, cg, BPF_CGROUP_SOCK_OPS, f"link the sock_ops program to {cgroup}"))
            finally:
                os.close(cg)
        except BaseException:
            self.close()
            raise
        self.joined = 0

    def _fd(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in reversed(self.fds):  # the link first: no socket joins the map after this
            os.close(fd)
        self.fds.clear()

    def watch_remote(self, addr: tuple[str, int]) -> None:
        """Sockets that become established with `addr` as their remote end join the SOCKHASH."""
        self.bpf.update(self.watch, watch_key(addr), b"\1\0\0\0", "watch an address")

    def unwatch_remote(self, addr: tuple[str, int]) -> None:
        self.bpf.delete(self.watch, watch_key(addr), "stop watching an address")

    def backend_socket(self) -> socket.socket:
        """A TCP socket bound to a loopback port the program watches: its peer (the backend's socket) joins
        the SOCKHASH when the connection is accepted. `unwatch_remote(sock.getsockname())` once connected."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            self.watch_remote(sock.getsockname())
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    def adopt(self, front: socket.socket) -> bytes | None:
        """Route the proxy's own writes to a client (`front`: the proxy's end) into the client's receive
        queue too, from the session's first byte on; the route's key, or None if the client's socket is not
        in the SOCKHASH. A client reads that queue before its TCP one, so everything the proxy sends it must
        arrive the way the backend's bytes will after `join`, or a reply could overtake the start-up."""
        client = tuple_key(front.getpeername(), front.getsockname())
        if self.bpf.lookup(self.socks, client, 8) is None:
            return None
        mine = tuple_key(front.getsockname(), front.getpeername())
        self.bpf.update(self.socks, mine, struct.pack("<Q", front.fileno()), "add the proxy's socket to the sockhash")
        try:
            self.bpf.update(self.routes, mine, ROUTE_VALUE.pack(client, ROUTE_PLAIN), "route the proxy's writes")
        except BaseException:
            self.bpf.delete(self.socks, mine, "remove the proxy's socket")
            raise
        return mine

    def join(self, front: socket.socket, back: socket.socket, ws: bool = False) -> tuple[bytes, ...]:
        """Route the peer of `front` (the client's socket) and the peer of `back` (the backend's) to each
        other; the route keys to `part` with. With `ws`, only the backend's sends take the shortcut, each
        as one WebSocket frame (the client's frames are masked: the proxy unmasks them). OSError if either
        peer is not in the SOCKHASH."""
        client = tuple_key(front.getpeername(), front.getsockname())
        backend = tuple_key(back.getpeername(), back.getsockname())
        for key, who in ((client, "the client's"), (backend, "the backend's")):
            if self.bpf.lookup(self.socks, key, 8) is None:
                raise BpfError(errno.ENOENT, f"{who} socket is not in the shortcut's sockhash")
        if self.bpf.lookup(self.routes, tuple_key(front.getsockname(), front.getpeername()), ROUTE_VALUE.size) is None:
            raise BpfError(errno.ENOENT, "the proxy's writes to the client were not routed from the start (`adopt`)")
        routes: tuple[bytes, ...] = (backend,) if ws else (backend, client)
        targets = {backend: client, client: backend}
        added: list[bytes] = []
        flags = ROUTE_WS_FRAMES if ws else ROUTE_PLAIN
        try:
            for key in routes:
                self.bpf.update(self.routes, key, ROUTE_VALUE.pack(targets[key], flags), "add a route")
                added.append(key)
        except BaseException:
            self.part(added)
            raise
        self.joined += 1
        return routes

    def part(self, keys) -> None:
        for key in keys:
            self.bpf.delete(self.routes, key, "remove a route")


def open_shortcut(bpf: Bpf) -> Shortcut | None:
    """The shortcut if this machine has what it needs; None (and why, in one log line) if not."""
    cgroup = cgroup2_root()
    if cgroup is None:
        log.info("socket shortcut unavailable (no cgroup v2 hierarchy is mounted)")
        return None
    try:
        return Shortcut(bpf, cgroup)
    except OSError as e:
        log.info("socket shortcut unavailable (%s)", e.strerror or e)
        return None
