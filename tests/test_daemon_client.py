"""The CLI's HTTP client against real loopback sockets: self-connections, garbage answers, daemon errors."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from neonctl import errors
from neonctl.engine import client
from neonctl.engine.process import http_ok


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_self_connection_counts_as_nothing_listening():
    """Linux connects a socket to itself when source and destination port coincide and nothing listens.

    Before the fix, a daemon poll read its own request back ("GET /v1/status HTTP/1.1") as the status line
    and crashed `neonctl start` with BadStatusLine.
    """
    port = _free_port()
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
    assert not http_ok(f"http://127.0.0.1:{_free_port()}/v1/status", timeout=1)


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
