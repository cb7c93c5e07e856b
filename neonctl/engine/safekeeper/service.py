"""The safekeeper daemon: HTTP control API, WAL receivers, WAL serving and broker publishing.

API (JSON over HTTP on 127.0.0.1):
  GET  /v1/status                          health and every timeline's state
  POST /v1/timeline                        create {timeline_id, system_id, pg_version, start_lsn}
  GET  /v1/timeline/{tl}                   state: term, flush/commit LSN, compute, streaming
  POST /v1/timeline/{tl}/compute           attach a compute {host, port, user, start_lsn}
  DELETE /v1/timeline/{tl}/compute         detach it (endpoint stop)
  GET  /v1/timeline/{tl}/wal?start=&after=&max=&wait=
                                           WAL bytes [start, flush) once flush > after
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
from pathlib import Path

import aiohttp
from aiohttp import web

from neonctl.engine.daemon import error_middleware, json_body, serve, setup_logging
from neonctl.engine.safekeeper.control_file import TimelineState
from neonctl.engine.safekeeper.receiver import run_receiver
from neonctl.engine.safekeeper.timeline import CONTROL_FILE, SkTimeline
from neonctl.errors import AlreadyExists, InvalidInput, NotFound

log = logging.getLogger("safekeeper")


class Safekeeper:
    def __init__(self, sk_id: int, workdir: Path, listen: str, broker: str | None):
        self.id = sk_id
        self.workdir = workdir
        self.listen = listen
        self.broker = broker
        self.timelines: dict[str, SkTimeline] = {}
        self.receivers: dict[str, tuple[asyncio.Task, asyncio.Event]] = {}
        (workdir / "timelines").mkdir(parents=True, exist_ok=True)

    @property
    def app_name(self) -> str:
        return f"sk{self.id}"

    def load(self) -> None:
        for d in sorted((self.workdir / "timelines").iterdir()):
            if (d / CONTROL_FILE).exists():
                tl = SkTimeline.open(d)
                self.timelines[tl.state.timeline_id] = tl
                log.info("loaded timeline %s flush_lsn %X", tl.state.timeline_id, tl.flush_lsn)

    def get(self, timeline_id: str) -> SkTimeline:
        tl = self.timelines.get(timeline_id)
        if tl is None:
            raise NotFound(f"timeline {timeline_id} not found on safekeeper {self.id}")
        return tl

    def start_receiver(self, tl: SkTimeline) -> None:
        self.stop_receiver(tl.state.timeline_id)
        stop = asyncio.Event()
        task = asyncio.create_task(run_receiver(tl, self.app_name, stop))
        self.receivers[tl.state.timeline_id] = (task, stop)

    def stop_receiver(self, timeline_id: str) -> None:
        entry = self.receivers.pop(timeline_id, None)
        if entry:
            entry[1].set()
            entry[0].cancel()

    # -- HTTP handlers ----------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        return json_body({"id": self.id, "timelines": {k: v.info() for k, v in self.timelines.items()}})

    async def create_timeline(self, request: web.Request) -> web.Response:
        body = await request.json()
        tid = body["timeline_id"]
        if tid in self.timelines:
            raise AlreadyExists(f"timeline {tid} already exists on safekeeper {self.id}")
        lsn = int(body["start_lsn"])
        state = TimelineState(timeline_id=tid, system_id=int(body["system_id"]), pg_version=int(body["pg_version"]),
                              timeline_start_lsn=lsn, flush_lsn=lsn, commit_lsn=lsn)
        self.timelines[tid] = SkTimeline.create(self.workdir / "timelines" / tid, state)
        return json_body(self.timelines[tid].info())

    async def delete_timeline(self, request: web.Request) -> web.Response:
        tl = self.get(request.match_info["tl"])
        tid = tl.state.timeline_id
        self.stop_receiver(tid)
        self.timelines.pop(tid)
        tl.wal.close()
        shutil.rmtree(tl.dir)
        return json_body({"deleted": tid})

    async def timeline_info(self, request: web.Request) -> web.Response:
        return json_body(self.get(request.match_info["tl"]).info())

    async def attach_compute(self, request: web.Request) -> web.Response:
        tl = self.get(request.match_info["tl"])
        body = await request.json()
        self.stop_receiver(tl.state.timeline_id)
        tl.reset_to(int(body["start_lsn"]))
        tl.state.term += 1  # a new compute is a new term (elections arrive with the quorum)
        tl.state.compute = {"host": body["host"], "port": int(body["port"]), "user": body.get("user", "postgres")}
        tl.persist()
        self.start_receiver(tl)
        return json_body(tl.info())

    async def detach_compute(self, request: web.Request) -> web.Response:
        tl = self.get(request.match_info["tl"])
        self.stop_receiver(tl.state.timeline_id)
        tl.state.compute = None
        tl.persist()
        return json_body(tl.info())

    async def read_wal(self, request: web.Request) -> web.Response:
        tl = self.get(request.match_info["tl"])
        q = request.query
        try:
            start = int(q["start"])
            after = int(q.get("after", start))
            limit = int(q.get("max", 8 << 20))
            wait = float(q.get("wait", 0))
        except (KeyError, ValueError) as e:
            raise InvalidInput(f"bad WAL request: {e}") from e
        if start < tl.state.timeline_start_lsn:
            raise InvalidInput(f"WAL before {tl.state.timeline_start_lsn:X} is not on this safekeeper")
        if tl.flush_lsn <= after and wait > 0:
            try:
                await asyncio.wait_for(tl.changed.wait(), timeout=wait)
            except asyncio.TimeoutError:
                pass
        end = min(tl.flush_lsn, start + limit)
        data = tl.wal.read(start, end - start) if end > start else b""
        return web.Response(body=data, content_type="application/octet-stream", headers={
            "X-Flush-Lsn": str(tl.flush_lsn), "X-Commit-Lsn": str(tl.commit_lsn), "X-Term": str(tl.state.term)})

    # -- background ------------------------------------------------------------

    async def persist_loop(self, stop: asyncio.Event) -> None:
        """Write control files lazily: their LSNs are hints, WAL on disk is the truth."""
        saved: dict[str, int] = {}
        while not stop.is_set():
            await asyncio.sleep(1.0)
            for tid, tl in list(self.timelines.items()):
                if saved.get(tid) != tl.record_lsn:
                    await asyncio.to_thread(tl.persist)
                    saved[tid] = tl.record_lsn

    async def publish_loop(self, stop: asyncio.Event) -> None:
        """Tell the storage broker our timelines' state about once a second."""
        if not self.broker:
            return
        failing = False
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while not stop.is_set():
                payload = {"safekeeper_id": self.id, "address": self.listen,
                           "timelines": {k: v.info() for k, v in self.timelines.items()}}
                try:
                    async with http.post(f"http://{self.broker}/v1/publish", data=json.dumps(payload)) as r:
                        r.raise_for_status()
                    if failing:
                        log.info("broker reachable again")
                    failing = False
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                    if not failing:
                        log.warning("cannot publish to broker %s: %s", self.broker, e)
                    failing = True
                await asyncio.sleep(1.0)

    async def startup(self, stop: asyncio.Event) -> None:
        for tl in self.timelines.values():
            if tl.state.compute:
                self.start_receiver(tl)

    def shutdown(self) -> None:
        for tid in list(self.receivers):
            self.stop_receiver(tid)
        for tl in self.timelines.values():
            tl.persist()
            tl.wal.close()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware], client_max_size=64 << 20)
        app.router.add_get("/v1/status", self.status)
        app.router.add_post("/v1/timeline", self.create_timeline)
        app.router.add_get("/v1/timeline/{tl}", self.timeline_info)
        app.router.add_delete("/v1/timeline/{tl}", self.delete_timeline)
        app.router.add_post("/v1/timeline/{tl}/compute", self.attach_compute)
        app.router.add_delete("/v1/timeline/{tl}/compute", self.detach_compute)
        app.router.add_get("/v1/timeline/{tl}/wal", self.read_wal)
        app["on_stop"] = self.shutdown
        return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="neonctl-safekeeper")
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--listen", default="127.0.0.1:5454")
    p.add_argument("--broker", default=None)
    args = p.parse_args(argv)
    setup_logging(f"sk{args.id}")
    sk = Safekeeper(args.id, args.workdir, args.listen, args.broker)
    sk.load()
    host, port = args.listen.rsplit(":", 1)
    serve(sk.app(), host, int(port), [sk.startup, sk.persist_loop, sk.publish_loop])
