"""The kernel relay's hand-assembled BPF program, byte by byte (no kernel needed), and how the relay refuses
where it cannot exist."""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import struct

import pytest
from sockets import accepting_link, recv_exactly

from neonctl.engine.proxy import bpf
from neonctl.engine.proxy import kernel_relay as kr
from neonctl.engine.proxy.link import Link

ROOT_X86 = os.geteuid() == 0 and platform.machine() == "x86_64"


def test_instruction_encoding():
    # struct bpf_insn: code, dst_reg (low nibble) | src_reg (high nibble), s16 off, s32 imm; little-endian
    assert bpf.insn(0x95) == b"\x95" + bytes(7)
    assert bpf.mov64_reg(bpf.R6, bpf.R1) == bytes.fromhex("bf16000000000000")
    assert bpf.mov64_imm(bpf.R0, 1) == bytes.fromhex("b700000001000000")
    assert bpf.add64_imm(bpf.R3, -8) == bytes.fromhex("07030000f8ffffff")
    assert bpf.store64(bpf.R10, -8, bpf.R0) == bytes.fromhex("7b0af8ff00000000")
    assert bpf.call(72) == bytes.fromhex("8500000048000000")
    assert bpf.load_map_fd(bpf.R2, 7) == bytes.fromhex("1812000007000000") + bytes(8)


def test_verdict_program():
    code = kr.verdict_program(map_fd=5)
    assert len(code) == 12 * 8
    expected = [
        "bf16000000000000",  # r6 = r1 (ctx)
        "850000002e000000",  # call bpf_get_socket_cookie
        "7b0af8ff00000000",  # *(u64 *)(r10 - 8) = r0
        "bf61000000000000",  # r1 = r6
        "1812000005000000",  # r2 = map fd 5 (ld_imm64, BPF_PSEUDO_MAP_FD) ...
        "0000000000000000",  # ... its second half
        "bfa3000000000000",  # r3 = r10
        "07030000f8ffffff",  # r3 += -8
        "b704000000000000",  # r4 = 0 (egress)
        "8500000048000000",  # call bpf_sk_redirect_hash
        "b700000001000000",  # r0 = SK_PASS
        "9500000000000000",  # exit
    ]
    assert [code[i:i + 8].hex() for i in range(0, len(code), 8)] == expected
    assert struct.unpack_from("<i", code, 4 * 8 + 4)[0] == 5


def test_switch_off_means_no_relay(monkeypatch):
    monkeypatch.setenv(kr.ENV_SWITCH, "0")
    assert kr.open_kernel_relay() is None


def test_other_architectures_are_refused(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(bpf.BpfError, match="aarch64"):
        kr.KernelRelay()
    monkeypatch.delenv(kr.ENV_SWITCH, raising=False)
    assert kr.open_kernel_relay() is None


@pytest.mark.skipif(not ROOT_X86, reason="needs root on x86-64")
def test_the_kernel_accepts_the_program():
    relay = kr.KernelRelay()  # map created, program verified, loaded and attached; a rejection shows the log
    try:
        assert relay.active() == 0 and relay.joined == 0
    finally:
        relay.close()


async def _relayed_pair(tmp_path, relay):
    """A TCP client and a Unix "compute", joined through two Links the way relay.Session joins them."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future = loop.create_future()
    tcp = await loop.create_server(lambda: accepting_link(accepted), "127.0.0.1", 0)
    path = str(tmp_path / "compute.sock")
    compute_side: asyncio.Future = loop.create_future()
    unix = await loop.create_unix_server(lambda: accepting_link(compute_side), path)
    client = socket.create_connection(tcp.sockets[0].getsockname())
    front = await accepted
    _t, back = await loop.create_unix_connection(Link, path)
    compute = (await compute_side).transport.get_extra_info("socket").dup()
    (await compute_side).transport.abort()  # the test talks on the duplicate, blocking
    assert relay.join(front, back, b"Z-first")
    return client, compute, front, back, (tcp, unix)


@pytest.mark.skipif(not ROOT_X86, reason="needs root on x86-64")
def test_tcp_to_unix_both_ways_and_hangup(tmp_path):
    async def main():
        relay = kr.KernelRelay()
        try:
            client, compute, front, back, servers = await _relayed_pair(tmp_path, relay)
            client.settimeout(10)
            compute.settimeout(10)
            assert recv_exactly(client, 7) == b"Z-first"
            assert relay.active() == 1
            for size in (1, 5000, 3_000_000):
                up, down = os.urandom(size), os.urandom(size)
                await asyncio.to_thread(client.sendall, up)
                assert await asyncio.to_thread(recv_exactly, compute, size) == up
                await asyncio.to_thread(compute.sendall, down)
                assert await asyncio.to_thread(recv_exactly, client, size) == down
            assert not front.buf and not back.buf  # nothing went through userspace
            compute.close()  # the compute goes away: the client is closed
            assert await asyncio.to_thread(client.recv, 1) == b""
            await asyncio.sleep(kr.GRACE + 0.1)
            assert relay.active() == 0 and front.closed and back.closed
            client.close()
            for s in servers:
                s.close()
        finally:
            relay.close()

    asyncio.run(main())
