"""The proxy daemon: the one address every client of a project uses (Neon's proxy, for one project).

    neonctl proxy: Postgres protocol on 127.0.0.1:<proxy_port>; HTTP on 127.0.0.1:<proxy_http_port>:
      GET /v1/status      sessions per endpoint (the daemon's health check)
      POST /sql           SQL over HTTP for the serverless driver's neon() (sql_over_http.py)
    and the Postgres protocol over WebSocket for its Pool and Client on 127.0.0.1:<proxy_ws_port>, at
    /v2, /v1 and / (websocket.py: its own listener, no HTTP server beneath the frames)

Each accepted connection, TCP or WebSocket, becomes a `relay.Session` (authenticate, route, wake, relay);
background tasks suspend idle computes (`suspend.py`) and delete expired branches (`engine/expiry.py`). The
proxy holds no state that matters across restarts: computes keep running while it is down, and new
connections work again once it is back.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

import uvloop
from aiohttp import web

from neonctl.engine.daemon import error_middleware, json_body, serve, setup_logging
from neonctl.engine.expiry import sweep_expired
from neonctl.engine.project import Project
from neonctl.engine.proxy import websocket
from neonctl.engine.proxy.conn_cache import ConnCache
from neonctl.engine.proxy.kernel_relay import open_kernel_relay
from neonctl.engine.proxy.link import Link
from neonctl.engine.proxy.relay import Session
from neonctl.engine.proxy.sessions import Sessions
from neonctl.engine.proxy.sql_over_http import SqlOverHttp
from neonctl.engine.proxy.suspend import run_suspender
from neonctl.engine.proxy.wake import Waker
from neonctl.engine.roles import Role, load_roles, roles_file

log = logging.getLogger("proxy")


class RoleCache:
    """The project's roles, re-read when roles.json changes (`neonctl roles ...` writes it)."""

    def __init__(self, project: Project):
        self.project = project
        self._stamp: tuple[int, int] | None = None
        self._roles: dict[str, Role] = {}

    def __call__(self) -> dict[str, Role]:
        try:
            st = os.stat(roles_file(self.project))
            stamp = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp is None or stamp != self._stamp:
            self._roles = load_roles(self.project)
            self._stamp = stamp
        return self._roles


class Proxy:
    def __init__(self, project: Project, suspend_interval: float, ws_addr: str | None = None):
        self.project = project
        self.ws_addr = ws_addr
        self.sessions = Sessions()
        self.waker = Waker(project)
        self.roles = RoleCache(project)
        self.suspend_interval = suspend_interval
        self.tasks: set[asyncio.Task] = set()
        self.cache = ConnCache()
        self.sql = SqlOverHttp(self.waker, self.sessions, self.roles, self.cache)
        self.kernel = open_kernel_relay()  # None: every session is relayed in userspace

    def _start_session(self, link: Link) -> None:
        session = Session(link, self.waker, self.sessions, self.roles, self.kernel)
        task = asyncio.get_running_loop().create_task(session.run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def accept(self) -> Link:
        link = Link()

        def made(transport, _orig=link.connection_made) -> None:
            _orig(transport)
            self._start_session(link)

        link.connection_made = made
        return link

    def accept_ws(self) -> websocket.WsLink:
        return websocket.WsLink(self._start_session)  # the session starts once the upgrade is answered

    async def status(self, request: web.Request) -> web.Response:
        return json_body(
            {
                "sessions": dict(self.sessions.active),
                "total": self.sessions.total(),
                "sql_cache": {"hits": self.cache.hits, "misses": self.cache.misses},
                "kernel_relay": {"on": self.kernel is not None,
                                 "sessions": self.kernel.active() if self.kernel else 0,
                                 "joined": self.kernel.joined if self.kernel else 0,
                                 "shortcut": bool(self.kernel and self.kernel.shortcut),
                                 "shortcut_joined": self.kernel.shortcut.joined
                                 if self.kernel and self.kernel.shortcut else 0},
            }
        )

    async def ws_elsewhere(self, request: web.Request) -> web.Response:
        """The WebSocket paths on the HTTP port (where they were before the WebSocket had its own port)."""
        where = f"ws://{self.ws_addr}/v2" if self.ws_addr else "the WebSocket port (restart with `neonctl start`)"
        return web.json_response({"message": f"the Postgres protocol over WebSocket is served at {where}: "
                                             "see `neonctl connection-string --serverless`"}, status=400)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware], client_max_size=11 * 1024 * 1024)
        app["public_paths"] = ("/sql", "/v1", "/v2", "/")  # clients' own ways in: they authenticate as roles
        app.router.add_get("/v1/status", self.status)
        app.router.add_post("/sql", self.sql.handle)
        app.router.add_route("OPTIONS", "/sql", self.sql.options)
        for path in websocket.PATHS:
            app.router.add_get(path, self.ws_elsewhere)
        return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="neonctl-proxy")
    p.add_argument("--project-dir", required=True, type=Path)
    p.add_argument("--listen", required=True, help="Postgres protocol address, 127.0.0.1:PORT")
    p.add_argument("--http", required=True, help="HTTP address (status, /sql), 127.0.0.1:PORT")
    p.add_argument("--ws", help="WebSocket address (the Postgres protocol in binary frames), 127.0.0.1:PORT")
    p.add_argument("--suspend-interval", type=float, default=1.0)
    p.add_argument("--expiry-interval", type=float, default=10.0)
    args = p.parse_args(argv)
    setup_logging("proxy")
    # uvloop's event loop (libuv) costs a fraction of asyncio's per callback, and every relayed query is two
    # callbacks: through the proxy, pgbench -S goes from ~0.6x to ~0.8x of direct (benchmarks/bench_proxy.py).
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    project = Project(args.project_dir)
    proxy = Proxy(project, args.suspend_interval, args.ws)
    http_host, http_port = args.http.rsplit(":", 1)

    async def listen(stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        servers = []
        for factory, addr in ((proxy.accept, args.listen), (proxy.accept_ws, args.ws)):
            if addr is None:
                continue
            h, pt = addr.rsplit(":", 1)
            try:
                servers.append(await loop.create_server(factory, h, int(pt), reuse_address=True, backlog=1024))
            except OSError as e:
                log.error("cannot listen on %s: %s", addr, e.strerror)
                os._exit(1)
            if proxy.kernel is not None:  # clients of either port may take the socket shortcut
                proxy.kernel.listening((h, int(pt)))
        log.info("proxy for project %s listening on %s%s", project.name, args.listen,
                 f", WebSocket on {args.ws}" if args.ws else "")
        try:
            await stop.wait()
        finally:
            for server in servers:
                server.close()

    async def suspender(stop: asyncio.Event) -> None:
        await run_suspender(project, proxy.sessions, stop, args.suspend_interval, on_suspend=proxy.cache.drop_endpoint)

    async def expirer(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                deleted = await asyncio.to_thread(sweep_expired, project)
                if deleted:
                    log.info("deleted expired branches: %s", ", ".join(deleted))
            except Exception:  # noqa: BLE001 - logged, retried on the next pass
                log.exception("expiry pass failed")
            try:
                await asyncio.wait_for(stop.wait(), args.expiry_interval)
            except TimeoutError:
                pass

    serve(proxy.app(), http_host, int(http_port), [listen, suspender, expirer, proxy.cache.run_expiry])
