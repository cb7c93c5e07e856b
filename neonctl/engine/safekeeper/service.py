"""The safekeeper daemon: HTTP control API, consensus messages, WAL receivers, peers and the broker.

API (JSON over HTTP on 127.0.0.1):
  GET  /v1/status                          health and every timeline's state
  POST /v1/timeline                        create {timeline_id, system_id, pg_version, start_lsn}
  GET  /v1/timeline/{tl}                   state: term, history, flush/commit LSN, compute, streaming
  DELETE /v1/timeline/{tl}                 delete it
  POST /v1/timeline/{tl}/vote              VoteRequest {term} -> VoteResponse (durable before the answer)
  POST /v1/timeline/{tl}/elected           ProposerElected {term, start_streaming_at, term_history}
  POST /v1/timeline/{tl}/recover           {term, donor, up_to}: pull WAL from the donor safekeeper
  POST /v1/timeline/{tl}/commit            {term, commit_lsn}: the proposer's commit_lsn
  POST /v1/timeline/{tl}/compute           attach the compute of a term {term, host, port, user, start_lsn}
  DELETE /v1/timeline/{tl}/compute         detach it (endpoint stop)
  POST /v1/timeline/{tl}/repair            rebuild a damaged timeline from peers; without peers
                                           {pageserver: {last_record_lsn, system_id, pg_version}}: at the
                                           end of the pageserver's WAL (pageserver_repair.py)
  GET  /v1/timeline/{tl}/wal?start=&after=&max=&wait=&upto=commit|flush&term=&ps_lsn=
                                           WAL bytes [start, commit_lsn or flush_lsn) once that is past
                                           `after`; `term` makes the read fail unless we are in that
                                           term; `ps_lsn` is what the pageserver has persisted

Background: the control files are written lazily (every second); the timeline
state is published to the broker about once a second; peers' state comes back
from the broker (or, while the broker is silent, straight from the peers) and
drives commit_lsn, peer recovery and WAL trimming.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from neonctl.engine.credentials import auth_headers
from neonctl.engine.daemon import error_middleware, json_body, serve, setup_logging
from neonctl.engine.durability import fsync_dir
from neonctl.engine.failpoints import afailpoint
from neonctl.engine.lsn import format_lsn
from neonctl.engine.safekeeper import pageserver_repair, peer_recovery
from neonctl.engine.safekeeper.acceptor import ProposerElected, VoteRequest
from neonctl.engine.safekeeper.control_file import TimelineState
from neonctl.engine.safekeeper.proposer import commit_lsn as quorum_commit_lsn
from neonctl.engine.safekeeper.proposer import quorum
from neonctl.engine.safekeeper.receiver import run_receiver
from neonctl.engine.safekeeper.term_history import TermSwitch
from neonctl.engine.safekeeper.timeline import (
    CONTROL_FILE,
    BrokenTimeline,
    SkTimeline,
    open_timeline,
    repair_hint,
)
from neonctl.errors import AlreadyExists, Conflict, CorruptData, InvalidInput, NotFound

log = logging.getLogger("safekeeper")

BROKER_SILENCE = 3.0  # seconds without a broker answer before peers are asked directly
TRIM_EVERY = 10.0
DELETED_PREFIX = ".deleted-"  # a timeline directory being removed; never loaded, removed at start-up


def _rename_durably(src: Path, dst: Path) -> None:
    os.rename(src, dst)
    fsync_dir(src.parent)


class Safekeeper:
    def __init__(self, sk_id: int, workdir: Path, listen: str, broker: str | None, peers: dict[int, str]):
        self.id = sk_id
        self.workdir = workdir
        self.listen = listen
        self.broker = broker
        self.peers = {k: v for k, v in peers.items() if k != sk_id}
        self.n = 1 + len(self.peers)
        self.timelines: dict[str, SkTimeline | BrokenTimeline] = {}
        self.receivers: dict[str, tuple[asyncio.Task, asyncio.Event]] = {}
        self.recoveries: dict[str, asyncio.Task] = {}
        self.peer_view: dict[str, dict[str, dict]] = {}  # timeline -> sk id -> its published state
        self.broker_ok_at = 0.0
        self._http: aiohttp.ClientSession | None = None
        self.wake = asyncio.Event()
        self.repair_lock = asyncio.Lock()  # one repair at a time: each replaces a timeline's files
        (workdir / "timelines").mkdir(parents=True, exist_ok=True)

    @property
    def http(self) -> aiohttp.ClientSession:
        """One client session for peers and the broker (created on the event loop at first use)."""
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), headers=auth_headers())
        return self._http

    @property
    def app_name(self) -> str:
        return f"sk{self.id}"

    def load(self) -> None:
        for d in sorted((self.workdir / "timelines").iterdir()):
            if d.name.startswith(DELETED_PREFIX):  # a deletion interrupted after its rename: finish it
                shutil.rmtree(d, ignore_errors=True)
            elif (d / CONTROL_FILE).exists():
                tl = open_timeline(d)
                self.timelines[tl.timeline_id] = tl
                if isinstance(tl, BrokenTimeline):
                    log.error("timeline %s is damaged and will not be served until repaired (%s): %s",
                              tl.timeline_id, repair_hint(self.id, single=not self.peers), tl.corrupt)
                else:
                    log.info("loaded timeline %s: term %d, flush_lsn %s, commit_lsn %s", tl.timeline_id, tl.term,
                             format_lsn(tl.flush_lsn), format_lsn(tl.commit_lsn))

    def lookup(self, timeline_id: str) -> SkTimeline | BrokenTimeline:
        tl = self.timelines.get(timeline_id)
        if tl is None:
            raise NotFound(f"timeline {timeline_id} not found on safekeeper {self.id}")
        return tl

    def get(self, timeline_id: str) -> SkTimeline:
        """A healthy timeline; a damaged one refuses to serve."""
        tl = self.lookup(timeline_id)
        if isinstance(tl, BrokenTimeline):
            raise CorruptData(f"safekeeper {self.id}: timeline {timeline_id} is damaged: {tl.corrupt}",
                              hint=repair_hint(self.id, single=not self.peers))
        return tl

    # -- receivers ---------------------------------------------------------------

    def start_receiver(self, tl: SkTimeline) -> None:
        if tl.timeline_id in self.receivers:
            return
        stop = asyncio.Event()
        task = asyncio.create_task(run_receiver(tl, self.app_name, stop, self.on_flushed))
        self.receivers[tl.timeline_id] = (task, stop)

    async def stop_receiver(self, timeline_id: str) -> None:
        entry = self.receivers.pop(timeline_id, None)
        if entry:
            entry[1].set()
            entry[0].cancel()
            await asyncio.gather(entry[0], return_exceptions=True)

    async def stop_recovery(self, timeline_id: str) -> None:
        task = self.recoveries.pop(timeline_id, None)
        if task:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def on_flushed(self, tl: SkTimeline) -> None:
        """After each batch from the compute. With peers, commit_lsn moves with their news instead."""
        if self.n == 1 and tl.flush_lsn > tl.commit_lsn and tl.flush_lsn >= tl.term_start_lsn:
            tl.update_commit(tl.flush_lsn)  # a single safekeeper is its own quorum

    # -- HTTP handlers: timelines ---------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        return json_body({"id": self.id, "safekeepers": self.n,
                          "timelines": {k: self.info(v) for k, v in self.timelines.items()}})

    def info(self, tl: SkTimeline | BrokenTimeline) -> dict:
        out = tl.info()
        out["safekeeper_id"] = self.id
        return out

    async def create_timeline(self, request: web.Request) -> web.Response:
        body = await request.json()
        tid = body["timeline_id"]
        if tid in self.timelines:
            raise AlreadyExists(f"timeline {tid} already exists on safekeeper {self.id}")
        lsn = int(body["start_lsn"])
        state = TimelineState(timeline_id=tid, system_id=int(body["system_id"]), pg_version=int(body["pg_version"]),
                              timeline_start_lsn=lsn, flush_lsn=lsn, commit_lsn=lsn)
        tl = await asyncio.to_thread(SkTimeline.create, self.workdir / "timelines" / tid, state)
        self.timelines[tid] = tl
        await afailpoint("sk-timeline-create-before-answer")
        return json_body(self.info(tl))

    async def delete_timeline(self, request: web.Request) -> web.Response:
        tl = self.lookup(request.match_info["tl"])
        tid = tl.timeline_id
        await self.stop_receiver(tid)
        await self.stop_recovery(tid)
        # A WAL write already handed to a thread outlives the receiver's cancellation; wait for it, then
        # move the directory aside in one rename, so a failure or crash from here on can never leave a
        # half-deleted timeline (a control file without its WAL) to be loaded as damaged.
        lock = tl.append_lock if isinstance(tl, SkTimeline) else contextlib.nullcontext()
        async with lock:
            self.timelines.pop(tid, None)
            tl.close()
            grave = tl.dir.with_name(f"{DELETED_PREFIX}{tid}-{secrets.token_hex(4)}")
            await asyncio.to_thread(_rename_durably, tl.dir, grave)
        await afailpoint("sk-timeline-delete-after-rename")
        self.peer_view.pop(tid, None)
        await asyncio.to_thread(shutil.rmtree, grave, True)
        return json_body({"deleted": tid})

    async def timeline_info(self, request: web.Request) -> web.Response:
        return json_body(self.info(self.get(request.match_info["tl"])))

    # -- HTTP handlers: consensus ------------------------------------------------------

    async def vote(self, request: web.Request) -> web.Response:
        tl = self.get(request.match_info["tl"])
        term = int((await request.json())["term"])
        if term > tl.term:
            # A vote for a newer term fences off the current compute: stop taking its WAL first.
            await self.stop_receiver(tl.timeline_id)
            await self.stop_recovery(tl.timeline_id)
            async with tl.append_lock:
                tl.normalize()
                resp = tl.acceptor.handle_vote_request(VoteRequest(term))
            log.info("timeline %s: voted for term %d (flush_lsn %s, last_log_term %d)", tl.timeline_id, term,
                     format_lsn(resp.flush_lsn), resp.last_log_term)
        else:
            resp = tl.acceptor.handle_vote_request(VoteRequest(term))
        return json_body({"sk_id": self.id, "term": resp.term, "vote_given": resp.vote_given,
                          "flush_lsn": resp.flush_lsn, "truncate_lsn": resp.truncate_lsn,
                          "term_history": [list(e) for e in resp.term_history],
                          "timeline_start_lsn": resp.timeline_start_lsn})

    async def elected(self, request: web.Request) -> web.Response:
        tl = self.get(request.match_info["tl"])
        body = await request.json()
        msg = ProposerElected(int(body["term"]), int(body["start_streaming_at"]),
                              tuple(TermSwitch(int(t), int(lsn)) for t, lsn in body["term_history"]))
        if msg.term < tl.term:
            raise Conflict(f"safekeeper {self.id} is at term {tl.term}: term {msg.term} was superseded")
        await self.stop_receiver(tl.timeline_id)
        await self.stop_recovery(tl.timeline_id)
        async with tl.append_lock:
            before = tl.flush_lsn
            tl.acceptor.handle_proposer_elected(msg)
            tl.compute = None  # the compute of the new term attaches next
            tl.persist()
        if msg.start_streaming_at < before:
            log.warning("timeline %s: term %d elected; truncated divergent WAL %s..%s", tl.timeline_id, msg.term,
                        format_lsn(msg.start_streaming_at), format_lsn(before))
        else:
            log.info("timeline %s: term %d elected, our WAL continues at %s", tl.timeline_id, msg.term,
                     format_lsn(tl.flush_lsn))
        return json_body(self.info(tl))

    async def recover(self, request: web.Request) -> web.Response:
        tl = self.get(request.match_info["tl"])
        body = await request.json()
        term, donor, up_to = int(body["term"]), body["donor"], int(body["up_to"])
        await self.stop_recovery(tl.timeline_id)
        try:
            end = await peer_recovery.pull_wal(tl, self.http, donor, term, up_to)
        except peer_recovery.RecoveryStopped as e:
            raise Conflict(f"safekeeper {self.id}: recovery from {donor} stopped: {e}") from None
        if end < up_to:
            raise Conflict(f"safekeeper {self.id}: donor {donor} gave WAL only up to {format_lsn(end)},"
                           f" not {format_lsn(up_to)}")
        log.info("timeline %s: recovered up to %s from %s for term %d", tl.timeline_id, format_lsn(end), donor, term)
        return json_body(self.info(tl))

    async def commit(self, request: web.Request) -> web.Response:
        tl = self.get(request.match_info["tl"])
        body = await request.json()
        term, lsn = int(body["term"]), int(body["commit_lsn"])
        if term != tl.term or not tl.in_term:
            raise Conflict(f"safekeeper {self.id} is at term {tl.term}, not {term}")
        tl.update_commit(lsn)
        await asyncio.to_thread(tl.write, tl.snapshot())
        return json_body(self.info(tl))

    async def attach_compute(self, request: web.Request) -> web.Response:
        tl = self.get(request.match_info["tl"])
        body = await request.json()
        term = int(body["term"])
        start = int(body["start_lsn"])
        if term != tl.term or not tl.in_term:
            raise Conflict(f"safekeeper {self.id} is at term {tl.term}, not {term}: the compute is not attached")
        if tl.flush_lsn > start:
            raise Conflict(f"safekeeper {self.id} holds WAL up to {format_lsn(tl.flush_lsn)} in term {term},"
                           f" past the compute's start {format_lsn(start)}")
        await self.stop_receiver(tl.timeline_id)
        tl.compute = {"host": body["host"], "port": int(body["port"]), "user": body.get("user", "postgres")}
        await asyncio.to_thread(tl.write, tl.snapshot())
        self.start_receiver(tl)
        return json_body(self.info(tl))

    async def detach_compute(self, request: web.Request) -> web.Response:
        tl = self.get(request.match_info["tl"])
        await self.stop_receiver(tl.timeline_id)
        tl.compute = {}  # detached: this term has no compute any more (peers learn it too)
        tl.last_error = None
        await asyncio.to_thread(tl.write, tl.snapshot())
        return json_body(self.info(tl))

    async def repair(self, request: web.Request) -> web.Response:
        """Rebuild a damaged timeline: from the healthiest peer, or without peers at the pageserver's WAL end.

        A lone safekeeper has nothing else to copy from. With peers, only peers: a peer may hold committed
        WAL the pageserver has not ingested yet, which a copy rebuilt from the pageserver would not have.
        """
        tid = request.match_info["tl"]
        async with self.repair_lock:
            tl = self.lookup(tid)
            if not isinstance(tl, BrokenTimeline):
                return json_body({**self.info(tl), "repaired": False})
            report: dict = {}
            if self.peers:
                new = await peer_recovery.repair(tl, self.http, list(self.peers.values()))
            else:
                try:
                    body = await request.json() if request.can_read_body else {}
                except ValueError:
                    raise InvalidInput("repair: the body is not JSON") from None
                if not isinstance(body, dict) or body.get("pageserver") is None:
                    raise InvalidInput(f"safekeeper {self.id} has no peers: a damaged timeline is rebuilt at the "
                                       "end of the pageserver's WAL, which the request must carry",
                                       hint=f"neonctl safekeeper repair {self.id}")
                point = pageserver_repair.PageserverPoint.from_json(body["pageserver"])
                new, report = await asyncio.to_thread(pageserver_repair.rebuild, tl, point)
                log.warning("timeline %s: %s", tid, report["summary"])
            self.timelines[tid] = new
        self.wake.set()
        if new.compute:
            self.start_receiver(new)
        return json_body({**self.info(new), "repaired": True, **report})

    async def read_wal(self, request: web.Request) -> web.Response:
        tl = self.get(request.match_info["tl"])
        q = request.query
        try:
            start = int(q["start"])
            after = int(q.get("after", start))
            limit = int(q.get("max", 8 << 20))
            wait = float(q.get("wait", 0))
            upto = q.get("upto", "commit")
            term = int(q["term"]) if "term" in q else None
            ps_lsn = int(q["ps_lsn"]) if "ps_lsn" in q else None
        except (KeyError, ValueError) as e:
            raise InvalidInput(f"bad WAL request: {e}") from e
        if upto not in ("commit", "flush"):
            raise InvalidInput(f"upto must be commit or flush, not {upto!r}")
        if ps_lsn is not None and ps_lsn > tl.remote_consistent_lsn:
            tl.remote_consistent_lsn = ps_lsn
        if term is not None and (term != tl.term or not tl.in_term):
            raise Conflict(f"safekeeper {self.id} is at term {tl.term}, not {term}")
        if start < tl.wal_start_lsn:
            raise InvalidInput(f"WAL before {format_lsn(tl.wal_start_lsn)} is not on safekeeper {self.id}")

        def limit_lsn() -> int:
            return tl.commit_lsn if upto == "commit" else tl.flush_lsn

        if limit_lsn() <= after and wait > 0:
            await (tl.wait_committed(wait) if upto == "commit" else tl.wait_flushed(wait))
            if term is not None and term != tl.term:
                raise Conflict(f"safekeeper {self.id} is at term {tl.term}, not {term}")
        end = min(limit_lsn(), start + limit)
        data = tl.read(start, end)
        return web.Response(body=data, content_type="application/octet-stream", headers={
            "X-Flush-Lsn": str(tl.flush_lsn), "X-Commit-Lsn": str(tl.commit_lsn), "X-Term": str(tl.term),
            "X-Last-Log-Term": str(tl.last_log_term)})

    # -- peers: commit_lsn, recovery, trimming -------------------------------------------

    def peers_of(self, timeline_id: str) -> dict[str, dict]:
        """The latest state each configured peer published for the timeline."""
        view = self.peer_view.get(timeline_id, {})
        return {k: v for k, v in view.items() if k != str(self.id) and int(k) in self.peers}

    def update_commit(self, tl: SkTimeline) -> None:
        """commit_lsn = the highest flush LSN on a quorum of safekeepers in our term (Raft's rule)."""
        if not tl.in_term:
            return
        term = tl.term
        flushes = [tl.flush_lsn]
        for info in self.peers_of(tl.timeline_id).values():
            if peer_recovery.in_term(info) and info["term"] == term and info.get("last_log_term") == term:
                flushes.append(info["flush_lsn"])
        c = quorum_commit_lsn(flushes, self.n, term_start_lsn=tl.term_start_lsn)
        if c:
            tl.update_commit(c)

    async def poll_peers(self) -> None:
        """The broker is silent: ask the peers directly (the broker's view is kept otherwise)."""
        for tid, _tl in list(self.timelines.items()):
            infos = await asyncio.gather(*(peer_recovery.fetch_info(self.http, a, tid) for a in self.peers.values()))
            view = self.peer_view.setdefault(tid, {})
            for sk_id, info in zip(self.peers, infos, strict=False):
                if info is not None:
                    view[str(sk_id)] = info

    async def peer_loop(self, stop: asyncio.Event) -> None:
        last_trim = time.monotonic()
        while not stop.is_set():
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=0.5)
            except TimeoutError:
                pass
            self.wake.clear()
            try:
                if self.peers and time.monotonic() - self.broker_ok_at > BROKER_SILENCE:
                    await self.poll_peers()
                for _tid, tl in list(self.timelines.items()):
                    if isinstance(tl, BrokenTimeline) or not self.peers:
                        continue
                    self.update_commit(tl)
                    self.maybe_recover(tl)
                if time.monotonic() - last_trim > TRIM_EVERY:
                    last_trim = time.monotonic()
                    for tl in list(self.timelines.values()):
                        if isinstance(tl, SkTimeline):
                            await self.trim(tl)
            except Exception:
                log.exception("peer loop failed")

    def maybe_recover(self, tl: SkTimeline) -> None:
        tid = tl.timeline_id
        task = self.recoveries.get(tid)
        if task is not None and not task.done():
            return
        if tl.streaming or tl.append_lock.locked():
            return
        peers = self.peers_of(tid)
        donor = peer_recovery.best_donor(tl, peers)
        if donor is None:
            if tl.in_term:  # attached or detached while we were away? ask the peer (the broker may be stale)
                for info in peers.values():
                    if (peer_recovery.in_term(info) and info["term"] == tl.term
                            and peer_recovery.compute_news(tl.compute, info.get("compute"))):
                        self.recoveries[tid] = asyncio.create_task(self._recover(tl, info))
                        return
            if tl.compute and tid not in self.receivers and tl.in_term:
                self.start_receiver(tl)
            return
        self.recoveries[tid] = asyncio.create_task(self._recover(tl, donor))

    async def _recover(self, tl: SkTimeline, donor: dict) -> None:
        try:
            await peer_recovery.recover_from(tl, self.http, donor)
        except peer_recovery.RecoveryStopped as e:
            log.info("timeline %s: recovery from %s stopped: %s", tl.timeline_id, donor.get("address"), e)
        except Exception:
            log.exception("timeline %s: recovery from %s failed", tl.timeline_id, donor.get("address"))
        if self.timelines.get(tl.timeline_id) is not tl:
            return
        if tl.compute and tl.timeline_id not in self.receivers:
            self.start_receiver(tl)
        elif not tl.compute and tl.timeline_id in self.receivers:
            await self.stop_receiver(tl.timeline_id)

    async def trim(self, tl: SkTimeline) -> None:
        """Remove WAL segments every consumer is done with.

        The horizon is the lowest of: what the pageserver has persisted (as reported to any of
        us), commit_lsn, and every peer's flush LSN (a lagging peer may still recover from us).
        A peer we have never heard of keeps everything.
        """
        peers = self.peers_of(tl.timeline_id)
        if len(peers) < len(self.peers) or any(p.get("corrupt") for p in peers.values()):
            return
        remote = max([tl.remote_consistent_lsn] + [p.get("remote_consistent_lsn") or 0 for p in peers.values()])
        horizon = min([remote, tl.commit_lsn] + [p.get("flush_lsn") or 0 for p in peers.values()])
        if horizon > tl.wal_start_lsn + tl.seg_size:
            await asyncio.to_thread(tl.write, tl.snapshot())  # commit_lsn on disk covers what goes
            n = tl.remove_segments_below(horizon)  # on the loop: the WAL writers' fd cache is not thread-safe
            if n:
                log.info("timeline %s: removed %d WAL segment(s) below %s", tl.timeline_id, n, format_lsn(horizon))

    # -- background ------------------------------------------------------------

    async def persist_loop(self, stop: asyncio.Event) -> None:
        """Write control files lazily: their LSNs are hints, WAL on disk is the truth."""
        saved: dict[str, tuple] = {}
        while not stop.is_set():
            await asyncio.sleep(1.0)
            for tid, tl in list(self.timelines.items()):
                if isinstance(tl, BrokenTimeline):
                    continue
                key = (tl.flush_lsn, tl.commit_lsn, tl.remote_consistent_lsn)
                if saved.get(tid) != key:
                    try:
                        await asyncio.to_thread(tl.write, tl.snapshot())
                    except FileNotFoundError:
                        # Deleted meanwhile: its directory was renamed away under the write, which WAL
                        # appends do not wait for (a delete waits for those only).
                        if self.timelines.get(tid) is tl:
                            raise
                        saved.pop(tid, None)
                        continue
                    saved[tid] = key
            for tid in saved.keys() - self.timelines.keys():
                del saved[tid]

    async def publish_loop(self, stop: asyncio.Event) -> None:
        """Tell the storage broker our timelines' state about once a second."""
        if not self.broker:
            return
        failing = False
        while not stop.is_set():
            payload = {"safekeeper_id": self.id, "address": self.listen,
                       "timelines": {k: self.info(v) for k, v in self.timelines.items()}}
            try:
                async with self.http.post(f"http://{self.broker}/v1/publish", data=json.dumps(payload),
                                          timeout=aiohttp.ClientTimeout(total=2)) as r:
                    r.raise_for_status()
                if failing:
                    log.info("broker reachable again")
                failing = False
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                if not failing:
                    log.warning("cannot publish to broker %s: %s", self.broker, e)
                failing = True
            await asyncio.sleep(1.0)

    async def subscribe_loop(self, stop: asyncio.Event) -> None:
        """Follow the broker: the peers' latest state per timeline; the last view survives an outage."""
        if not self.broker or not self.peers:
            return
        version = -1
        while not stop.is_set():
            try:
                async with self.http.get(f"http://{self.broker}/v1/subscribe", params={"after": version, "wait": 2},
                                         timeout=aiohttp.ClientTimeout(total=5)) as r:
                    r.raise_for_status()
                    msg = await r.json()
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
                await asyncio.sleep(1.0)
                continue
            version = -1 if msg["version"] < version else msg["version"]  # a restarted broker counts anew
            self.broker_ok_at = time.monotonic()
            for tid, per_sk in msg["timelines"].items():
                if tid in self.timelines:
                    view = self.peer_view.setdefault(tid, {})
                    view.update({k: v for k, v in per_sk.items() if k != str(self.id)})
            self.wake.set()

    async def startup(self, stop: asyncio.Event) -> None:
        if not self.peers:  # with peers, the peer loop restarts receivers once it knows we are current
            for tl in self.timelines.values():
                if isinstance(tl, SkTimeline) and tl.compute:
                    self.start_receiver(tl)
        try:
            await asyncio.gather(self.publish_loop(stop), self.subscribe_loop(stop), self.peer_loop(stop))
        finally:
            await self.http.close()

    def shutdown(self) -> None:
        for _tid, (task, ev) in list(self.receivers.items()):
            ev.set()
            task.cancel()
        for tl in self.timelines.values():
            if isinstance(tl, SkTimeline):
                tl.persist()
            tl.close()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware], client_max_size=64 << 20)
        app.router.add_get("/v1/status", self.status)
        app.router.add_post("/v1/timeline", self.create_timeline)
        app.router.add_get("/v1/timeline/{tl}", self.timeline_info)
        app.router.add_delete("/v1/timeline/{tl}", self.delete_timeline)
        app.router.add_post("/v1/timeline/{tl}/vote", self.vote)
        app.router.add_post("/v1/timeline/{tl}/elected", self.elected)
        app.router.add_post("/v1/timeline/{tl}/recover", self.recover)
        app.router.add_post("/v1/timeline/{tl}/commit", self.commit)
        app.router.add_post("/v1/timeline/{tl}/compute", self.attach_compute)
        app.router.add_delete("/v1/timeline/{tl}/compute", self.detach_compute)
        app.router.add_post("/v1/timeline/{tl}/repair", self.repair)
        app.router.add_get("/v1/timeline/{tl}/wal", self.read_wal)
        app["on_stop"] = self.shutdown
        return app


def parse_peers(text: str) -> dict[int, str]:
    """`1=127.0.0.1:5454,2=127.0.0.1:5455` -> {1: '127.0.0.1:5454', 2: ...}."""
    out = {}
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        out[int(k)] = v
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="neonctl-safekeeper")
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--listen", default="127.0.0.1:5454")
    p.add_argument("--broker", default=None)
    p.add_argument("--peers", default="", help="all safekeepers of the project: ID=HOST:PORT,...")
    args = p.parse_args(argv)
    setup_logging(f"sk{args.id}")
    sk = Safekeeper(args.id, args.workdir, args.listen, args.broker, parse_peers(args.peers))
    sk.load()
    log.info("safekeeper %d of %d (quorum %d)", args.id, sk.n, quorum(sk.n))
    host, port = args.listen.rsplit(":", 1)
    serve(sk.app(), host, int(port), [sk.startup, sk.persist_loop])
