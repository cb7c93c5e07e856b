"""The pageserver's WAL receiver: follow the broker, pull committed WAL from the best safekeeper.

For each timeline it streams from one safekeeper at a time, chosen from the
state the safekeepers publish to the broker, as Neon's walreceiver does:

- start with the safekeeper with the highest ``commit_lsn`` (ties: flush LSN);
- switch when the current one lags the best by ``MAX_LSN_WAL_LAG`` or more, when
  it has not published for ``LAGGING_WAL_TIMEOUT`` while another has, or when it
  fails a request;
- with no broker information (the broker is down or has not heard from anyone
  yet) keep the current one, falling back to the configured safekeepers.

It asks only for WAL up to the safekeeper's ``commit_lsn`` (``upto=commit``): WAL
above it may be a divergent tail that the next election truncates. Every
request restarts at the timeline's last complete record, so a partial record is
re-read, never spliced, and carries ``ps_lsn``, the timeline's
``remote_consistent_lsn``: WAL below it is in remote storage (a pageserver that
lost its disk is rebuilt from there), so the safekeepers may remove it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from neonctl.engine.pageserver.timeline.timeline import Timeline

log = logging.getLogger("pageserver.walreceiver")

MAX_LSN_WAL_LAG = 16 << 20  # switch when another safekeeper's commit_lsn is this far ahead
LAGGING_WAL_TIMEOUT = 5.0  # switch when the current safekeeper has not published for this long
FAILED_BACKOFF = 2.0  # skip a safekeeper that failed a request for this long
# After a request that brought less than BATCH_BYTES of WAL, wait this long before the next one, so that a
# busy compute's commits arrive in batches: one request per commit cost both daemons more CPU than ingesting
# the WAL (measured under pgbench). A request after an empty one goes out at once (and long-polls).
BATCH_DELAY = 0.01
BATCH_BYTES = 1 << 20


def _fresh(s: dict, now: float) -> bool:
    return now - s.get("published_at", 0) < LAGGING_WAL_TIMEOUT


def _usable(s: dict) -> bool:
    return not s.get("corrupt") and s.get("commit_lsn") is not None and "address" in s


def pick_safekeeper(broker_view: dict[str, dict], fallback: list[str], now: float | None = None) -> list[str]:
    """Safekeeper addresses to try, best first: fresh ones by commit_lsn, then stale ones, then the configured."""
    now = time.time() if now is None else now
    usable = [s for s in broker_view.values() if _usable(s)]
    ranked = sorted(usable, key=lambda s: (_fresh(s, now), s.get("commit_lsn", 0), s.get("flush_lsn", 0)),
                    reverse=True)
    out = [s["address"] for s in ranked]
    return out + [a for a in fallback if a not in out]


def choose(current: str | None, broker_view: dict[str, dict], fallback: list[str], failed: dict[str, float],
           now: float | None = None, stalled_at: int | None = None) -> list[str]:
    """The order to try safekeepers in: the current one first unless it should be replaced.

    `stalled_at`: the current one gave no new WAL for LAGGING_WAL_TIMEOUT and we are at this LSN.
    """
    now = time.time() if now is None else now
    mono = time.monotonic()
    order = [a for a in pick_safekeeper(broker_view, fallback, now) if mono - failed.get(a, -1e9) > FAILED_BACKOFF]
    if not order:
        order = pick_safekeeper(broker_view, fallback, now)
    if current is None or current not in order:
        return order
    by_addr = {s["address"]: s for s in broker_view.values() if _usable(s)}
    cur, best = by_addr.get(current), by_addr.get(order[0])
    switch = False
    if cur is not None and best is not None and best is not cur:
        if best.get("commit_lsn", 0) - cur.get("commit_lsn", 0) >= MAX_LSN_WAL_LAG:
            switch = True  # the current one lags
        elif not _fresh(cur, now) and _fresh(best, now):
            switch = True  # the current one went silent
        elif stalled_at is not None and best.get("commit_lsn", 0) > stalled_at:
            switch = True  # it gives nothing although another has committed WAL we lack
    if switch:
        return order
    return [current] + [a for a in order if a != current]


async def receive(tl: Timeline, http: aiohttp.ClientSession, broker_view: dict, fallback: list[str],
                  stop: asyncio.Event) -> None:
    failures = 0
    current: str | None = None
    failed: dict[str, float] = {}
    progress_at = time.monotonic()
    while not stop.is_set():
        stalled = time.monotonic() - progress_at > LAGGING_WAL_TIMEOUT
        candidates = choose(current, broker_view.get(tl.timeline_id, {}), fallback, failed,
                            stalled_at=tl.last_record_lsn if stalled else None)
        progressed = False
        for addr in candidates:
            start = tl.last_record_lsn
            params = {"start": start, "after": max(tl.received_lsn, start), "wait": 1.0, "max": 16 << 20,
                      "upto": "commit", "ps_lsn": tl.remote_consistent_lsn or 0}
            try:
                async with http.get(f"http://{addr}/v1/timeline/{tl.timeline_id}/wal", params=params) as r:
                    if r.status in (400, 404, 409):  # not here, damaged, or WAL before its start was removed
                        failed[addr] = time.monotonic()
                        continue
                    r.raise_for_status()
                    data = await r.read()
                    tl.sk_flush_lsn = int(r.headers["X-Flush-Lsn"])
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                if failures % 50 == 0:
                    log.info("timeline %s: safekeeper %s unavailable: %s", tl.timeline_id, addr, e)
                failures += 1
                failed[addr] = time.monotonic()
                continue
            failures = 0
            if addr != current:
                log.info("timeline %s: streaming WAL from safekeeper %s at %X", tl.timeline_id, addr, start)
                current = addr
                progress_at = time.monotonic()
            if data:
                progress_at = time.monotonic()
                await asyncio.to_thread(tl.ingest, start, data)
            else:
                await asyncio.to_thread(tl.maybe_freeze)  # time-based freeze while idle
            tl.notify()
            progressed = True
            if 0 < len(data) < BATCH_BYTES:
                await asyncio.sleep(BATCH_DELAY)
            break
        if not progressed:
            await asyncio.sleep(0.2)
