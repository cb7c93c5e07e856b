"""The socket shortcut (`proxy/shortcut.py`): its programs byte by byte, and a session's client and backend
sockets joined directly by the kernel, with real TCP sockets on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest
from sockets import accepting_link, recv_exactly

from neonctl.engine.proxy import bpf
from neonctl.engine.proxy import kernel_relay as kr
from neonctl.engine.proxy import shortcut as sc
from neonctl.engine.proxy.link import Link


def test_labels_resolve_to_instruction_offsets():
    code = bpf.assemble(bpf.mov64_imm(bpf.R0, 0), bpf.Jump(bpf.R0, "==", 0, "end"),
                        bpf.load_map_fd(bpf.R1, 3), "end", bpf.exit_())
    insns = [code[i:i + 8] for i in range(0, len(code), 8)]
    assert len(insns) == 5
    assert insns[1] == bpf.insn(0x15, bpf.R0, off=2, imm=0)  # skips the 16-byte ld_imm64


def test_keys_match_what_the_kernel_shows_the_programs():
    # remote port: network order, shifted into the upper half; local port: host order
    assert sc.watch_key(("127.0.0.1", 5432)) == bytes([127, 0, 0, 1]) + struct.pack("<I", 0x3815 << 16)
    key = sc.tuple_key(("127.0.0.1", 40000), ("127.0.0.2", 5432))
    assert key[:8] == bytes([127, 0, 0, 1, 127, 0, 0, 2])
    assert struct.unpack("<II", key[8:]) == (40000, 0x3815 << 16)


def test_programs_end_in_pass_and_return_one():
    for code in (sc.sock_ops_program(3, 4), sc.msg_program(3, 5)):
        assert len(code) % 8 == 0
        assert code[-16:] == bpf.mov64_imm(bpf.R0, 1) + bpf.exit_()  # 1: sock_ops' "done", SK_PASS for sk_msg
    assert bpf.call(bpf.BPF_FUNC_msg_redirect_hash) in sc.msg_program(3, 5)
    assert bpf.mov64_imm(bpf.R4, bpf.BPF_F_INGRESS) in sc.msg_program(3, 5)


async def _session(relay, watched_backend: bool = True):
    """A client, a "proxy" with two Links, a TCP "compute": wired as relay.Session wires them."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future = loop.create_future()
    proxy = await loop.create_server(lambda: accepting_link(accepted), "127.0.0.1", 0)
    relay.listening(proxy.sockets[0].getsockname())
    compute = socket.create_server(("127.0.0.1", 0))
    client = await asyncio.to_thread(socket.create_connection, proxy.sockets[0].getsockname())
    front = await accepted
    relay.adopt(front)  # as relay.Session does first: the proxy's writes to the client take the shortcut too
    if watched_backend:
        sock = relay.shortcut.backend_socket()
    else:
        sock = socket.socket()
        sock.setblocking(False)
    await loop.sock_connect(sock, compute.getsockname())
    _t, back = await loop.create_connection(Link, sock=sock)
    backend, _ = await asyncio.to_thread(compute.accept)
    for s in (client, backend):
        s.settimeout(10)
    back.write(b"startup")  # the handshake goes the usual way before the join
    assert await asyncio.to_thread(recv_exactly, backend, 7) == b"startup"
    return client, backend, front, back, (proxy, compute)


def test_joined_ends_talk_directly_and_hang_up_through_the_proxy():
    async def main():
        relay = kr.KernelRelay()
        assert relay.shortcut is not None, "the shortcut did not load on a machine that has what it needs"
        try:
            client, backend, front, back, servers = await _session(relay)
            assert relay.join(front, back, b"Z-first")
            assert relay.shortcut.joined == 1
            # a backend's bytes sent before the client read the start-up do not overtake it (both went into
            # the client's receive queue of the shortcut, which the client reads before its TCP one)
            await asyncio.to_thread(backend.sendall, b"early")
            assert recv_exactly(client, 12) == b"Z-firstearly"
            proxy_socks = relay.pairs and next(iter(relay.pairs.values())).socks
            for size in (1, 5000, 3_000_000):
                up, down = os.urandom(size), os.urandom(size)
                await asyncio.to_thread(client.sendall, up)
                assert await asyncio.to_thread(recv_exactly, backend, size) == up
                await asyncio.to_thread(backend.sendall, down)
                assert await asyncio.to_thread(recv_exactly, client, size) == down
            for s in proxy_socks:  # the proxy's own sockets saw none of it
                assert kr.queued(s.fileno()) == 0
            backend.close()  # the compute goes away: the proxy closes the client
            assert await asyncio.to_thread(client.recv, 1) == b""
            await asyncio.sleep(kr.GRACE + 0.1)
            assert relay.active() == 0 and front.closed and back.closed
            client.close()
            for s in servers:
                s.close()
        finally:
            relay.close()

    asyncio.run(main())


def test_a_backend_the_program_did_not_see_goes_through_the_sockmap_relay():
    async def main():
        relay = kr.KernelRelay()
        try:
            client, backend, front, back, servers = await _session(relay, watched_backend=False)
            assert relay.join(front, back, b"Z")
            assert relay.shortcut.joined == 0 and relay.joined == 1
            assert recv_exactly(client, 1) == b"Z"
            await asyncio.to_thread(client.sendall, b"query")
            assert await asyncio.to_thread(recv_exactly, backend, 5) == b"query"
            await asyncio.to_thread(backend.sendall, b"rows")
            assert await asyncio.to_thread(recv_exactly, client, 4) == b"rows"
            client.close()
            assert await asyncio.to_thread(backend.recv, 1) == b""
            backend.close()
            for s in servers:
                s.close()
        finally:
            relay.close()

    asyncio.run(main())


def test_only_sockets_with_a_watched_remote_end_join_and_close_releases_everything():
    relay = kr.KernelRelay()
    shortcut = relay.shortcut
    try:
        with socket.create_server(("127.0.0.1", 0)) as srv:
            def captured() -> bool:
                c = socket.create_connection(srv.getsockname())
                s, _ = srv.accept()
                try:
                    return relay.bpf.lookup(shortcut.socks, sc.tuple_key(c.getsockname(), c.getpeername()), 8) \
                        is not None
                finally:
                    c.close()
                    s.close()

            assert not captured()  # nobody watches this listener
            relay.listening(srv.getsockname())
            assert captured()  # a client of a watched listener joins the map when established
            shortcut.unwatch_remote(srv.getsockname())
            assert not captured()
    finally:
        relay.close()
    assert shortcut.fds == []  # the maps, the programs and the cgroup link: all closed


def _server_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """Unmasked server frames (FIN + binary) -> their payloads, and the bytes of an incomplete last frame."""
    out, pos = [], 0
    while len(data) - pos >= 2:
        assert data[pos] == 0x82, f"not a final binary frame at {pos}: {data[pos]:#x}"
        n, head = data[pos + 1], 2
        assert not n & 0x80, "a server frame is never masked"
        if n == 126:
            if len(data) - pos < 4:
                break
            n, head = int.from_bytes(data[pos + 2:pos + 4], "big"), 4
        elif n == 127:
            if len(data) - pos < 10:
                break
            n, head = int.from_bytes(data[pos + 2:pos + 10], "big"), 10
        if len(data) - pos < head + n:
            break
        out.append(data[pos + head:pos + head + n])
        pos += head + n
    return out, data[pos:]


def test_backend_sends_reach_a_websocket_client_as_frames():
    relay = kr.KernelRelay()
    try:
        sh = relay.shortcut
        with socket.create_server(("127.0.0.1", 0)) as ws_port, socket.create_server(("127.0.0.1", 0)) as compute:
            relay.listening(ws_port.getsockname())
            client = socket.create_connection(ws_port.getsockname())
            front, _ = ws_port.accept()
            back = sh.backend_socket()
            back.setblocking(True)
            back.connect(compute.getsockname())
            backend, _ = compute.accept()
            for s in (client, front, back, backend):
                s.settimeout(10)
            with pytest.raises(OSError, match="adopt"):  # the proxy's own writes must take the same way first
                sh.join(front, back, ws=True)
            assert sh.adopt(front) is not None
            front.sendall(b"first")  # what the proxy writes arrives as written (the upgrade, ReadyForQuery)
            assert recv_exactly(client, 5) == b"first"
            assert sh.join(front, back, ws=True) == (sc.tuple_key(backend.getsockname(), backend.getpeername()),)
            client.sendall(b"masked frames go to the proxy")  # the client's direction is not routed
            assert recv_exactly(front, 29) == b"masked frames go to the proxy"
            sent = [os.urandom(n) for n in (1, 125, 126, 5000, 65535, 65536, 200_000)]
            got, rest = [], b""
            for payload in sent:
                backend.sendall(payload)
                want = sum(map(len, got)) + len(payload)
                while sum(map(len, got)) < want:
                    frames, rest = _server_frames(rest + client.recv(1 << 20))
                    got += frames
            assert b"".join(got) == b"".join(sent) and rest == b""
            assert len(got) >= len(sent) and all(got)  # a large send may go as several whole frames
            assert kr.queued(back.fileno()) == 0  # nothing reached the proxy's socket
            sh.part((sc.tuple_key(backend.getsockname(), backend.getpeername()),))
            backend.sendall(b"after")  # no route: the usual way, unframed, to the proxy's socket
            assert recv_exactly(back, 5) == b"after"
            for s in (client, front, back, backend):
                s.close()
    finally:
        relay.close()
