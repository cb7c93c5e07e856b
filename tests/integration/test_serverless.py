"""SQL over HTTP and WebSocket on the proxy, driven by the real `@neondatabase/serverless` npm package.

`.ci/run` installs the driver (and `ws`) into tests/serverless/node_modules from the npm registry; Node
comes from the machine. Each scenario of tests/serverless/driver_check.mjs is one test here, configured
only with what `neonctl connection-string --serverless -o json` prints. Bad input is checked over raw
HTTP and WebSocket.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import running_main

from neonctl.cli import main as cli_main
from neonctl.engine.connection import proxy_uri, serverless_config

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


def test_websocket_garbage_and_close_mid_query(driver_env):
    import asyncio

    import aiohttp

    p, _ = driver_env
    url = f"ws://{p.proxy_http_addr}/v2?address=127.0.0.1:{p.config.proxy_port}"

    async def run():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(url) as ws:
                await ws.send_bytes(b"\x00\x00\x00\x08garbage!")
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"E" and b"C08P01" in msg.data
            async with s.ws_connect(url) as ws:  # closes half-way through its start-up
                await ws.send_bytes(b"\x00\x00\x00\x40\x00\x03")
            async with s.post(f"http://{p.proxy_http_addr}/sql", data='{"query": "SELECT 1"}',
                              headers={"Neon-Connection-String": proxy_uri(p, "main")}) as r:
                assert r.status == 200  # still serving

    asyncio.run(run())
    cfg = _cs_serverless(p)
    env = {**os.environ, "NEON_URI": cfg["connection_string"], "NEON_CONFIG": json.dumps(cfg["neon_config"])}
    proc = subprocess.run([shutil.which("node"), "driver_check.mjs", "parameterised"], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
