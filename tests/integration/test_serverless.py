"""SQL over HTTP and WebSocket on the proxy, driven by the real `@neondatabase/serverless` npm package.

`.ci/run` installs the driver (and `ws`) into tests/serverless/node_modules from the npm registry; Node
comes from the machine. Each scenario of tests/serverless/driver_check.mjs is one test here, configured
only with what `neonctl connection-string --serverless -o json` prints. Bad input is checked over raw
HTTP and WebSocket (raw sockets on the proxy's WebSocket port, and aiohttp's client), and a project from
before that port existed gets one at its next `start`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import running_main

from neonctl.cli import main as cli_main
from neonctl.engine import client, pgwire
from neonctl.engine.connection import proxy_uri, serverless_config
from neonctl.engine.process import pid_cmdline
from neonctl.engine.roles import get_role

HERE = Path(__file__).resolve().parents[1] / "serverless"
SCENARIOS = ["types", "parameterised", "arraymode_fullresults", "transaction_commits_and_rolls_back",
             "error_sqlstate", "thousand_rows", "pool_concurrent", "client_begin_rollback",
             "wrong_password_http", "wrong_password_ws"]


@pytest.fixture(scope="module")
def driver_env(pg18):
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is required for the serverless driver tests (apt install nodejs)")
    if not (HERE / "node_modules" / "@neondatabase" / "serverless").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=HERE, check=True, timeout=300)
    with running_main(pg18):
        yield pg18, node


def _cs_serverless(p) -> dict:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_main(["connection-string", "main", "--serverless", "-o", "json", "-p", p.name]) == 0
    return json.loads(buf.getvalue())


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_driver(driver_env, scenario):
    p, node = driver_env
    cfg = _cs_serverless(p)
    assert set(cfg) == {"connection_string", "neon_config"}
    env = {**os.environ, "NEON_URI": cfg["connection_string"], "NEON_CONFIG": json.dumps(cfg["neon_config"])}
    proc = subprocess.run([node, "driver_check.mjs", scenario], cwd=HERE, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def _post(p, body: bytes | str, headers: dict) -> tuple[int, dict]:
    url = serverless_config(p)["fetchEndpoint"]
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_sql_bad_input(driver_env):
    p, _ = driver_env
    good = {"Neon-Connection-String": proxy_uri(p, "main"), "Content-Type": "application/json"}
    assert _post(p, '{"query": "SELECT 1 AS x", "params": []}', good)[1]["rows"] == [{"x": "1"}]
    st, body = _post(p, "{not json", good)
    assert st == 400 and "JSON" in body["message"]
    st, body = _post(p, '{"query": "SELECT 1"}', {"Content-Type": "application/json"})
    assert st == 400 and "Neon-Connection-String" in body["message"]
    st, body = _post(p, '{"query": "SELECT 1"}', {**good, "Neon-Connection-String": "not a url"})
    assert st == 400 and "malformed" in body["message"]
    st, body = _post(p, '{"query": "SELECT 1"}', {**good, "Neon-Connection-String": proxy_uri(p, "nope")})
    assert st == 400 and "does not exist" in body["message"]
    st, body = _post(p, '{"queries": [{"query": "SELECT 1"}]}', {**good, "Neon-Batch-Isolation-Level": "Chaos"})
    assert st == 400 and "isolation" in body["message"].lower()
    st, body = _post(p, '{"query": "SELECT $1::int, $2::int", "params": [1]}', good)
    assert st == 400 and body["code"] == "08P01"
    st, body = _post(p, b'{"query": "' + b"x" * (11 * 1024 * 1024) + b'"}', good)
    assert st == 507
    st, body = _post(p, '{"query": "SELECT 1"}', {**good, "Neon-Connection-String": proxy_uri(p, "main").replace(
        "postgres:", "postgres:x", 1)})
    assert st == 400 and body["code"] == "28P01"
    assert _post(p, '{"query": "SELECT 2 AS y"}', good)[1]["rows"] == [{"y": "2"}]  # still up


def _ws_url(p) -> str:
    return f"ws://{serverless_config(p)['wsProxy']}?address=127.0.0.1:{p.config.proxy_port}"


def _upgrade(addr: str, request: bytes | None = None) -> tuple[socket.socket, bytes, bytes]:
    """A raw socket to the WebSocket port after sending an upgrade request: (socket, answer head, rest)."""
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(request or (f"GET /v2?address=x:1 HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                          ).encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return s, head, rest


def _frame(op: int, payload: bytes, mask: bytes | None = b"\x11\x22\x33\x44") -> bytes:
    assert len(payload) < 126
    if mask is None:
        return bytes((0x80 | op, len(payload))) + payload
    return bytes((0x80 | op, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _read_frame(s: socket.socket, buf: bytes) -> tuple[int, bytes, bytes]:
    """(opcode, payload, what is left) of the next (short, unmasked) server frame."""
    while len(buf) < 2 or len(buf) < 2 + (buf[1] & 0x7F):
        chunk = s.recv(4096)
        assert chunk, f"connection closed after {buf!r}"
        buf += chunk
    n = buf[1] & 0x7F
    assert n < 126 and not buf[1] & 0x80
    return buf[0] & 0x0F, buf[2:2 + n], buf[2 + n:]


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(4096) == b""
    except ConnectionResetError:
        return True


def test_websocket_port_control_frames_and_bad_frames(driver_env):
    p, _ = driver_env
    addr = serverless_config(p)["wsProxy"].split("/", 1)[0]
    assert addr == p.proxy_ws_addr != p.proxy_http_addr
    s, head, rest = _upgrade(addr)
    with s:
        assert head.startswith(b"HTTP/1.1 101 ")
        s.sendall(_frame(0x9, b"hi"))
        op, payload, rest = _read_frame(s, rest)
        assert (op, payload) == (0xA, b"hi")  # ping -> pong
        s.sendall(_frame(0x8, struct.pack("!H", 4001) + b"bye"))
        op, payload, rest = _read_frame(s, rest)
        assert op == 0x8 and payload[:2] == struct.pack("!H", 4001)  # close -> close with its code
        assert not rest and _closed(s)
    s, head, rest = _upgrade(addr)
    with s:  # a client frame without a mask: protocol error 1002
        s.sendall(_frame(0x2, b"\x00\x00\x00\x08\x04\xd2\x16\x2f", mask=None))
        op, payload, rest = _read_frame(s, rest)
        assert op == 0x8 and payload[:2] == struct.pack("!H", 1002)
        assert _closed(s)
    s, head, _ = _upgrade(addr, b"GET /v2 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\nSec-WebSocket-Version: 8\r\n\r\n")
    with s:
        assert head.startswith(b"HTTP/1.1 426 ") and b"Sec-WebSocket-Version: 13" in head and _closed(s)
    s, head, _ = _upgrade(addr, b"\x16\x03\x01 not http at all\r\n\r\n")
    with s:
        assert head.startswith(b"HTTP/1.1 400 ") and _closed(s)
    s, head, rest = _upgrade(addr)
    with s:  # closes half-way through a frame of its start-up packet
        s.sendall(_frame(0x2, b"\x00\x00\x00\x40\x00\x03")[:5])
    # the WebSocket paths of the HTTP port say where the WebSocket is now
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://{p.proxy_http_addr}/v2", timeout=10)
    assert e.value.code == 400 and f"ws://{p.proxy_ws_addr}/v2" in json.loads(e.value.read())["message"]
    assert _post(p, '{"query": "SELECT 3 AS z"}', {"Neon-Connection-String": proxy_uri(p, "main")})[1]["rows"] == [
        {"z": "3"}]


def test_websocket_garbage_and_close_mid_query(driver_env):
    import asyncio

    import aiohttp

    p, _ = driver_env
    url = _ws_url(p)

    async def run():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(url) as ws:
                await ws.send_bytes(b"\x00\x00\x00\x08garbage!")
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"E" and b"C08P01" in msg.data
            async with s.ws_connect(url) as ws:  # closes half-way through its start-up
                await ws.send_bytes(b"\x00\x00\x00\x40\x00\x03")
            async with s.ws_connect(url) as ws:  # a query in flight when the client goes
                await ws.send_bytes(pgwire.startup_message({"user": "postgres", "database": "postgres"}))
                msg = await ws.receive(timeout=10)
                assert msg.data[:1] == b"R"  # cleartext password request (no endpoint= option)
                pw = "endpoint=main;" + get_role(p, "postgres").password
                await ws.send_bytes(pgwire.message(b"p", pw.encode() + b"\0"))
                got = b""
                while b"Z\x00\x00\x00\x05I" not in got:
                    got += (await ws.receive(timeout=10)).data
                await ws.send_bytes(pgwire.query("SELECT pg_sleep(0.5)"))
            async with s.post(f"http://{p.proxy_http_addr}/sql", data='{"query": "SELECT 1"}',
                              headers={"Neon-Connection-String": proxy_uri(p, "main")}) as r:
                assert r.status == 200  # still serving

    asyncio.run(run())
    cfg = _cs_serverless(p)
    env = {**os.environ, "NEON_URI": cfg["connection_string"], "NEON_CONFIG": json.dumps(cfg["neon_config"])}
    proc = subprocess.run([shutil.which("node"), "driver_check.mjs", "parameterised"], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_websocket_session_through_the_socket_shortcut(driver_env):
    """With the kernel's socket shortcut the compute's replies reach a WebSocket client as frames the kernel
    writes (`proxy/shortcut.py`): a pipelined start-up still reads in order, a large result is exact, and a
    ping answered by the proxy mid-result does not cut into a frame."""
    import asyncio
    import hashlib

    import aiohttp

    p, _ = driver_env
    before = client.status("proxy", p.proxy_http_addr)["kernel_relay"]

    async def run() -> bytes:
        async with aiohttp.ClientSession() as s, s.ws_connect(_ws_url(p), autoping=False) as ws:
            pw = "endpoint=main;" + get_role(p, "postgres").password
            big = "SELECT string_agg(md5(g::text), '' ORDER BY g) FROM generate_series(1, 30000) g"
            await ws.send_bytes(pgwire.startup_message({"user": "postgres", "database": "postgres"})
                                + pgwire.message(b"p", pw.encode() + b"\0") + pgwire.query("SELECT 6 * 7"))
            await ws.send_bytes(pgwire.query(big))
            await ws.ping(b"mid-result")
            got, pong = b"", False
            while got.count(b"Z\x00\x00\x00\x05I") < 3:
                msg = await ws.receive(timeout=20)
                if msg.type == aiohttp.WSMsgType.PONG:
                    pong = msg.data == b"mid-result"
                    continue
                assert msg.type == aiohttp.WSMsgType.BINARY, msg
                got += msg.data
            assert pong
            return got

    got = asyncio.run(run())
    buf = pgwire.MessageBuffer()
    buf.feed(got)
    kinds, rows = [], []
    while (m := buf.next_message()) is not None:
        kinds.append(m[0])
        if m[0] == b"D":
            rows.append(pgwire.parse_data_row(m[1])[0])
    assert kinds[0] == b"R" and kinds.count(b"Z") == 3 and kinds[-1] == b"Z"
    assert rows == ["42", "".join(hashlib.md5(str(g).encode()).hexdigest() for g in range(1, 30001))]
    after = client.status("proxy", p.proxy_http_addr)["kernel_relay"]
    assert before["shortcut"], "the socket shortcut needs root and cgroup v2 (as the kernel relay tests)"
    assert after["shortcut_joined"] == before["shortcut_joined"] + 1  # the kernel framed the replies


def test_a_project_from_before_the_websocket_port_gets_one_at_start(driver_env, cli):
    p, node = driver_env
    p.daemon("proxy").stop()
    with p.lock():  # as an older neonctl left it: two proxy ports, and a proxy started without --ws
        p.reload()
        p.config.proxy_ws_port = None
        p.save()
    proxy = p.daemon("proxy")
    proxy.start()
    assert "--ws" not in pid_cmdline(proxy.pid())
    old = proxy.pid()
    daemons = json.loads(cli("status", "-p", p.name, "-o", "json")[1])["daemons"]
    assert "ws_address" not in next(d for d in daemons if d["name"] == "proxy")
    _, out, err = cli("connection-string", "main", "--serverless", "-p", p.name)  # assigns the port, says why
    assert "predates its WebSocket port" in err and "neonConfig.wsProxy" in out
    _, _, err = cli("start", "-p", p.name)
    p.reload()
    assert p.config.proxy_ws_port is not None and "WebSocket port" in err
    assert proxy.pid() not in (None, old) and "--ws" in pid_cmdline(proxy.pid())  # restarted with the port
    daemons = json.loads(cli("status", "-p", p.name, "-o", "json")[1])["daemons"]
    assert next(d for d in daemons if d["name"] == "proxy")["ws_address"] == p.proxy_ws_addr
    cfg = _cs_serverless(p)
    assert cfg["neon_config"]["wsProxy"] == f"{p.proxy_ws_addr}/v2"
    env = {**os.environ, "NEON_URI": cfg["connection_string"], "NEON_CONFIG": json.dumps(cfg["neon_config"])}
    proc = subprocess.run([node, "driver_check.mjs", "client_begin_rollback"], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
