"""The storage broker: a tiny pub/sub for timeline state.

Safekeepers publish their per-timeline state about once a second; the
pageserver and the other safekeepers subscribe with a long poll and learn, per
timeline, which safekeepers hold WAL and how far (term, last_log_term,
flush/commit/backup/remote_consistent LSNs, address). The broker keeps only the
latest message per (safekeeper, timeline) in memory and forgets one that has
not been repeated for ``TTL`` seconds (a safekeeper that is gone, a timeline
that was deleted): losing it all loses nothing, publishers simply repeat
themselves, and subscribers keep their last view while the broker is away.

  POST /v1/publish       {safekeeper_id, address, timelines: {tl: state}}
  GET  /v1/subscribe?after=VERSION&wait=SECONDS   -> {version, timelines: {tl: {sk_id: state}}}
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web

from neonctl.engine.daemon import error_middleware, json_body, serve, setup_logging

TTL = 60.0


class Broker:
    def __init__(self) -> None:
        self.version = 0
        self.state: dict[str, dict[str, dict]] = {}
        self.changed = asyncio.Event()

    async def publish(self, request: web.Request) -> web.Response:
        body = await request.json()
        sk = str(body["safekeeper_id"])
        now = time.time()
        for tl, info in body.get("timelines", {}).items():
            self.state.setdefault(tl, {})[sk] = {**info, "address": body["address"], "published_at": now}
        self.expire(now)
        self.version += 1
        self.changed.set()
        self.changed = asyncio.Event()
        return json_body({"version": self.version})

    def expire(self, now: float) -> None:
        for tl in list(self.state):
            per_sk = self.state[tl]
            for sk in [k for k, v in per_sk.items() if now - v["published_at"] > TTL]:
                del per_sk[sk]
            if not per_sk:
                del self.state[tl]

    async def subscribe(self, request: web.Request) -> web.Response:
        after = int(request.query.get("after", -1))
        wait = float(request.query.get("wait", 0))
        if self.version <= after and wait > 0:
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=wait)
            except TimeoutError:
                pass
        return json_body({"version": self.version, "timelines": self.state})

    async def status(self, request: web.Request) -> web.Response:
        return json_body({"version": self.version, "timelines": len(self.state)})

    def app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware])
        app.router.add_post("/v1/publish", self.publish)
        app.router.add_get("/v1/subscribe", self.subscribe)
        app.router.add_get("/v1/status", self.status)
        return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="neonctl-broker")
    p.add_argument("--listen", default="127.0.0.1:50051")
    args = p.parse_args(argv)
    setup_logging("broker")
    host, port = args.listen.rsplit(":", 1)
    serve(Broker().app(), host, int(port), [])
