"""The CLI's HTTP client against real loopback sockets: self-connections, garbage answers, daemon errors."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from neonctl import errors
from neonctl.engine import client
from neonctl.engine.ports import ephemeral_port
from neonctl.engine.process import http_ok


def test_a_self_connection_counts_as_nothing_listening():
    """Linux connects a socket to itself when source and destination port coincide and nothing listens.

    Before the fix, a daemon poll read its own request back ("GET /v1/status HTTP/1.1") as the status line
    and crashed `neonctl start` with BadStatusLine.
    """
    port = ephemeral_port()
    conn = client._LoopbackConnection("127.0.0.1", port, timeout=2, source_address=("127.0.0.1", port))
    with pytest.raises(ConnectionRefusedError, match="connected to itself"):
        conn.connect()
    # The port is free again: a daemon can bind it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_garbage_answer_is_unreachable_not_a_crash():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]

    def serve():
        c, _ = srv.accept()
        c.recv(4096)
        c.sendall(b"this is not HTTP\r\n\r\n")
        c.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        with pytest.raises(errors.DaemonError, match="not reachable: not an HTTP answer"):
            client.call("pageserver", f"127.0.0.1:{port}", "GET", "/v1/status", timeout=5)
    finally:
        t.join()
        srv.close()
    assert not http_ok(f"http://127.0.0.1:{ephemeral_port()}/v1/status", timeout=1)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("fail"):
            payload = json.dumps({"error": "no such branch 'x'", "kind": "NotFound", "hint": "list them"})
            self.send_response(404)
        else:
            payload = json.dumps({"echo": body})
            self.send_response(200)
        self.send_header("X-Neonctl-Pid", "42")
        self.end_headers()
        self.wfile.write(payload.encode())

    do_GET = lambda self: (self.send_response(200), self.send_header("X-Neonctl-Pid", "42"),  # noqa: E731
                           self.end_headers())


def test_json_calls_and_daemon_errors_round_trip():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    addr = f"127.0.0.1:{srv.server_address[1]}"
    try:
        assert client.call("ps", addr, "POST", "/v1/x", {"a": 1}) == {"echo": {"a": 1}}
        with pytest.raises(errors.NotFound, match="no such branch") as e:
            client.call("ps", addr, "POST", "/v1/x", {"fail": True})
        assert e.value.hint == "list them"
        assert http_ok(f"http://{addr}/v1/status", pid=42)
        assert not http_ok(f"http://{addr}/v1/status", pid=43)
    finally:
        srv.shutdown()
        srv.server_close()


class LayerFenced(errors.Conflict):
    """An error kind defined outside neonctl.errors: it must still cross HTTP as itself."""


def test_error_kinds_defined_anywhere_cross_http_as_the_same_class():
    import asyncio

    from aiohttp import web

    from neonctl.engine.daemon import error_middleware

    async def fail(request):
        kind = request.query["kind"]
        if kind == "fenced":
            raise LayerFenced("the layer is fenced", hint="retry later")
        raise errors.NotFound("no such timeline")

    ready, stop = threading.Event(), threading.Event()
    port = ephemeral_port()

    def serve():
        async def main():
            app = web.Application(middlewares=[error_middleware])
            app.router.add_get("/v1/fail", fail)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)
            await runner.cleanup()

        asyncio.run(main())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(10)
    try:
        with pytest.raises(LayerFenced) as e:
            client.call("pageserver", f"127.0.0.1:{port}", "GET", "/v1/fail?kind=fenced")
        assert (e.value.message, e.value.hint, e.value.kind) == ("the layer is fenced", "retry later", "LayerFenced")
        with pytest.raises(errors.NotFound, match="no such timeline"):
            client.call("pageserver", f"127.0.0.1:{port}", "GET", "/v1/fail?kind=nf")
    finally:
        stop.set()
        t.join(10)
    assert errors.error_class("LayerFenced") is LayerFenced
    assert errors.error_class("NoSuchKind") is None
    with pytest.raises(TypeError, match="must be unique"):
        type("LayerFenced", (errors.NeonctlError,), {})
