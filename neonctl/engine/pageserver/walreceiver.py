"""The pageserver's WAL receiver: follow the broker, pull WAL from the best safekeeper.

For each timeline it picks the safekeeper with the highest commit LSN that the
broker reported (falling back to the configured safekeepers when the broker is
silent), long-polls it for WAL after what it already has, and ingests it.
Each request restarts at the timeline's last complete record, so a torn or
rewritten tail is re-read, never spliced.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from neonctl.engine.pageserver.timeline import Timeline

log = logging.getLogger("pageserver.walreceiver")


def pick_safekeeper(broker_view: dict[str, dict], fallback: list[str]) -> list[str]:
    """Safekeeper addresses to try, best first: highest commit_lsn, then the configured ones."""
    ranked = sorted(broker_view.values(), key=lambda s: (s.get("commit_lsn", 0), s.get("flush_lsn", 0)), reverse=True)
    out = [s["address"] for s in ranked]
    return out + [a for a in fallback if a not in out]


async def receive(tl: Timeline, http: aiohttp.ClientSession, broker_view: dict, fallback: list[str],
                  stop: asyncio.Event) -> None:
    failures = 0
    while not stop.is_set():
        candidates = pick_safekeeper(broker_view.get(tl.timeline_id, {}), fallback)
        progressed = False
        for addr in candidates:
            start = tl.last_record_lsn
            params = {"start": start, "after": max(tl.received_lsn, start), "wait": 1.0, "max": 16 << 20}
            try:
                async with http.get(f"http://{addr}/v1/timeline/{tl.timeline_id}/wal", params=params) as r:
                    if r.status == 404:
                        continue
                    r.raise_for_status()
                    data = await r.read()
                    tl.sk_flush_lsn = int(r.headers["X-Flush-Lsn"])
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                if failures % 50 == 0:
                    log.info("timeline %s: safekeeper %s unavailable: %s", tl.timeline_id, addr, e)
                failures += 1
                continue
            failures = 0
            if data:
                await asyncio.to_thread(tl.ingest, start, data)
            tl.notify()
            progressed = True
            break
        if not progressed:
            await asyncio.sleep(0.2)
