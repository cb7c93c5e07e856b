"""SQL over HTTP and WebSocket against the same compute reached over TCP, in one run.

1. `/sql` `SELECT 1` with a warm connection cache: latency p50/p99 of --requests sequential requests, and
   requests per second with --concurrency concurrent clients for --seconds; against a fresh psycopg
   connection per request (what a serverless function without the HTTP path pays), through the proxy and
   directly (target: /sql >= 5x faster than a fresh connection).
2. The Postgres protocol over the WebSocket (as the driver's Pool sends it), `SELECT 1` latency p50 on
   one session, against a psycopg query on an open direct TCP connection (target: within 1.5x). The
   WebSocket client is written out here (`WsClient`: blocking socket, handshake, frames masked with one
   random key per connection) rather than taken from a library: this measures the proxy, and an asyncio
   client library's own event-loop round trips per message would cost more than psycopg's C client does on
   the TCP side of the comparison.

    python benchmarks/bench_serverless.py [--quick] [--json]
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BenchEnv, bench_parser, log, run_benchmark  # noqa: E402

from neonctl.engine import pgwire  # noqa: E402
from neonctl.engine.compute.endpoint import start_endpoint  # noqa: E402
from neonctl.engine.connection import direct_uri, proxy_uri, serverless_config  # noqa: E402
from neonctl.engine.proxy.scram import ScramClient  # noqa: E402
from neonctl.engine.roles import get_role  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000, 3)


async def sql_latency(url: str, headers: dict, n: int) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            t = time.perf_counter()
            async with s.post(url, data=json.dumps({"query": "SELECT 1", "params": []}), headers=headers) as r:
                assert r.status == 200, await r.text()
                await r.read()
            out.append(time.perf_counter() - t)
    return out


async def sql_rps(url: str, headers: dict, concurrency: int, seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(s):
        nonlocal done
        while time.perf_counter() < deadline:
            async with s.post(url, data='{"query": "SELECT 1", "params": []}', headers=headers) as r:
                await r.read()
            done += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        t = time.perf_counter()
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
        return done / (time.perf_counter() - t)


def fresh_conn_latency(uri: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        with psycopg.connect(uri, autocommit=True) as c:
            c.execute("SELECT 1").fetchone()
        out.append(time.perf_counter() - t)
    return out


class WsClient:
    """The client side of a WebSocket, as few steps as it takes: a blocking socket, the upgrade request,
    binary frames out (masked, as RFC 6455 requires of a client, with one random key per connection) and
    frames in (a server's are not masked). Enough for the Postgres protocol against the proxy, no more."""

    GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url: str):
        u = urlsplit(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16))
        target = u.path + (f"?{u.query}" if u.query else "")
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n".encode()
                          + b"Sec-WebSocket-Key: " + key + b"\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"the WebSocket upgrade got no answer: {data[:200]!r}")
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        accept = base64.b64encode(hashlib.sha1(key + self.GUID).digest())
        if not head.startswith(b"HTTP/1.1 101 ") or b"Sec-WebSocket-Accept: " + accept not in head:
            raise ConnectionError(f"the WebSocket upgrade was refused: {data[:300]!r}")
        self.buf = bytearray(rest)
        self.mask = os.urandom(4)

    def send(self, payload: bytes) -> None:
        n = len(payload)
        head = bytes((0x82, 0x80 | n)) if n < 126 else bytes((0x82, 0xFE)) + n.to_bytes(2, "big")
        key = (self.mask * (n // 4 + 1))[:n]
        body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        self.sock.sendall(head + self.mask + body)

    def recv(self) -> bytes:
        """The payload of the next data frame (the proxy sends whole, unfragmented binary frames)."""
        buf = self.buf
        while True:
            if len(buf) >= 2:
                op, n = buf[0] & 0x0F, buf[1] & 0x7F
                head = 4 if n == 126 else 10 if n == 127 else 2
                if head > 2 and len(buf) >= head:
                    n = int.from_bytes(buf[2:head], "big")
                if len(buf) >= head + n:
                    payload = bytes(buf[head:head + n])
                    del buf[:head + n]
                    if op == 0x8:
                        raise ConnectionError(f"the proxy closed the WebSocket: {payload!r}")
                    if op in (0x1, 0x2):
                        return payload
                    continue  # a ping or pong
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the proxy closed the connection")
            buf += chunk

    def close(self) -> None:
        self.sock.close()


def ws_latency(url: str, password: str, n: int) -> list[float]:
    """A WebSocket session as the driver's Pool opens one (SCRAM), then n sequential `SELECT 1`."""
    ws = WsClient(url)
    buf = pgwire.MessageBuffer()

    def next_msg() -> tuple[bytes, bytes]:
        while True:
            m = buf.next_message()
            if m is not None:
                return m
            buf.feed(ws.recv())

    try:
        ws.send(pgwire.startup_message({"user": "postgres", "database": "postgres", "options": "endpoint=main"}))
        client = ScramClient(password)
        while True:
            kind, body = next_msg()
            code = int.from_bytes(body[:4], "big") if kind == b"R" else None
            if code == 10:
                first = client.first()
                ws.send(pgwire.message(b"p", b"SCRAM-SHA-256\0" + len(first).to_bytes(4, "big") + first))
            elif code == 11:
                ws.send(pgwire.message(b"p", client.final(body[4:])))
            elif code == 12:
                client.verify(body[4:])
            elif kind == b"E":
                raise RuntimeError(pgwire.parse_error_fields(body))
            elif kind == b"Z":
                break
        query = pgwire.query("SELECT 1")
        out = []
        for _ in range(n):
            t = time.perf_counter()
            ws.send(query)
            while next_msg()[0] != b"Z":
                pass
            out.append(time.perf_counter() - t)
        ws.send(pgwire.terminate())
        return out
    finally:
        ws.close()


def tcp_latency(uri: str, n: int) -> list[float]:
    out = []
    with psycopg.connect(uri, autocommit=True) as c:
        for _ in range(n):
            t = time.perf_counter()
            c.execute("SELECT 1").fetchone()
            out.append(time.perf_counter() - t)
    return out


def body(env: BenchEnv) -> None:
    a = env.args
    p = env.project("serverlessbench")
    p.set_suspend_timeout(0)
    st = start_endpoint(p, "main")
    cfg = serverless_config(p)
    headers = {"Neon-Connection-String": proxy_uri(p, "main"), "Neon-Raw-Text-Output": "true",
               "Neon-Array-Mode": "true", "Content-Type": "application/json"}
    asyncio.run(sql_latency(cfg["fetchEndpoint"], headers, 20))  # warm the cache
    sql_lat = asyncio.run(sql_latency(cfg["fetchEndpoint"], headers, a.requests))
    rps = asyncio.run(sql_rps(cfg["fetchEndpoint"], headers, a.concurrency, a.seconds))
    log(f"/sql: p50 {pct(sql_lat, 50)} ms, p99 {pct(sql_lat, 99)} ms, {rps:.0f} req/s")
    fresh_proxy = fresh_conn_latency(proxy_uri(p, "main"), a.requests // 4)
    fresh_direct = fresh_conn_latency(direct_uri(p, st.port), a.requests // 4)
    log(f"fresh psycopg connection per request: proxy p50 {pct(fresh_proxy, 50)} ms, direct {pct(fresh_direct, 50)}")
    ws_url = f"ws://{cfg['wsProxy']}?address=127.0.0.1:{p.config.proxy_port}"
    ws = ws_latency(ws_url, get_role(p, "postgres").password, a.requests)
    tcp = tcp_latency(direct_uri(p, st.port), a.requests)
    log(f"WebSocket query p50 {pct(ws, 50)} ms, direct TCP psycopg p50 {pct(tcp, 50)} ms")
    env.result["sql"] = {"p50_ms": pct(sql_lat, 50), "p99_ms": pct(sql_lat, 99), "rps": round(rps),
                         "concurrency": a.concurrency}
    env.result["fresh_connection"] = {"proxy_p50_ms": pct(fresh_proxy, 50), "direct_p50_ms": pct(fresh_direct, 50)}
    env.result["sql_speedup_vs_fresh"] = {
        "proxy": round(statistics.median(fresh_proxy) / statistics.median(sql_lat), 2),
        "direct": round(statistics.median(fresh_direct) / statistics.median(sql_lat), 2)}
    env.result["websocket"] = {"p50_ms": pct(ws, 50), "tcp_p50_ms": pct(tcp, 50),
                               "ratio": round(statistics.median(ws) / statistics.median(tcp), 2)}


def render(res: dict) -> list[str]:
    if "sql" not in res:
        return []
    s, f, w = res["sql"], res["fresh_connection"], res["websocket"]
    return ["",
            f"/sql SELECT 1 (warm cache): p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms; {s['rps']} req/s with "
            f"{s['concurrency']} concurrent clients",
            f"fresh psycopg connection + SELECT 1: through the proxy {f['proxy_p50_ms']} ms, direct "
            f"{f['direct_p50_ms']} ms -> /sql is {res['sql_speedup_vs_fresh']['proxy']}x / "
            f"{res['sql_speedup_vs_fresh']['direct']}x faster (target >= 5x)",
            f"WebSocket SELECT 1 p50 {w['p50_ms']} ms vs direct TCP psycopg {w['tcp_p50_ms']} ms -> {w['ratio']}x "
            "(target <= 1.5x)"]


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--requests", type=int, help="sequential requests per latency measure (default 400; --quick 80)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, help="throughput run length (default 5; --quick 2)")
    a = ap.parse_args(argv)
    a.requests = a.requests or (80 if a.quick else 400)
    a.seconds = a.seconds or (2 if a.quick else 5)
    return run_benchmark(a, "serverless", body, render)


if __name__ == "__main__":
    sys.exit(main())
