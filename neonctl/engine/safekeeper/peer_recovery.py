"""Peer recovery: a safekeeper catches up from another safekeeper, without a compute.

A safekeeper that was down while the others went on (or during an election)
comes back with an old term, maybe a divergent tail, and less WAL. It learns
its peers' state from the broker (or by asking them directly when the broker
is silent) and, while no compute streams to it, recovers from the best peer:
the highest (last_log_term, flush_lsn) among peers that have joined their term.

1. **Join the peer's term.** The peer's term history is the history the
   elected proposer of that term handed out (``ProposerElected``), so taking
   it from the peer is the same as taking it from the proposer: the acceptor
   computes the highest common point of the two histories, truncates its WAL
   there (never below ``commit_lsn``) and adopts the history. That is where a
   divergent tail - WAL of an old term that the new term's quorum never had -
   is cut.
2. **Pull WAL.** Fetch ``[our WAL end, peer flush_lsn)`` from the peer in
   chunks, checking on both sides that the term did not change meanwhile;
   write, fdatasync, advance. The bytes are the peer's own bytes of the same
   history, so the record boundaries we track carry on seamlessly.

The same ``pull_wal`` serves the election (the CLI asks lagging voters to
fetch from the donor up to the new term's start) and ``repair`` (a timeline
whose control file or WAL failed verification is rebuilt from a healthy peer).
"""

from __future__ import annotations

import asyncio
import logging
import shutil

import aiohttp

from neonctl.engine.lsn import format_lsn
from neonctl.engine.safekeeper.acceptor import ProposerElected
from neonctl.engine.safekeeper.control_file import TimelineState
from neonctl.engine.safekeeper.term_history import (
    TermHistory,
    TermSwitch,
    find_highest_common_point,
)
from neonctl.engine.safekeeper.timeline import CONTROL_FILE, BrokenTimeline, SkTimeline
from neonctl.engine.wal.reader import WalDecodeError
from neonctl.errors import Conflict, DaemonError

log = logging.getLogger("safekeeper.recovery")

CHUNK = 4 << 20


class RecoveryStopped(Exception):
    """The term changed (or the donor stopped serving it) while pulling WAL."""


def in_term(info: dict) -> bool:
    h = info.get("term_history") or []
    return not info.get("corrupt") and info.get("term") is not None and bool(h) and h[-1][0] == info["term"]


def rank(info: dict) -> tuple[int, int]:
    return (info.get("last_log_term") or 0, info.get("flush_lsn") or 0)


def best_donor(tl: SkTimeline, peers: dict[str, dict]) -> dict | None:
    """The peer to recover from, or None when no peer is ahead of us.

    Candidates have joined their term and that term is not below ours (our term is a promise
    not to go back). We recover when the best one is in a newer term, when we have not joined
    our own term yet, or when it simply holds more WAL of the same history.
    """
    cands = [i for i in peers.values() if in_term(i) and i["term"] >= tl.term]
    if not cands:
        return None
    best = max(cands, key=rank)
    if best["term"] > tl.term or not tl.in_term:
        return best
    return best if rank(best) > (tl.last_log_term, tl.flush_lsn) else None


def compute_news(mine: dict | None, theirs: dict | None) -> bool | None:
    """Whether a peer of our term knows about the term's compute what we do not.

    ``None``: no compute attached in this term yet; a dict: attached there; ``{}``: detached
    (endpoint stop). A term's compute is attached once and detached once, so news only ever
    moves None -> attached -> detached; anything else is stale (the broker lags a second).
    """
    return (theirs == {} and mine != {}) or bool(theirs and mine is None)


def join_term(tl: SkTimeline, term: int, history: list) -> int:
    """Adopt the history of `term` (as ProposerElected would); returns where our WAL now ends."""
    h = TermHistory(TermSwitch(int(t), int(lsn)) for t, lsn in history)
    if tl.term == term and tl.in_term and h == tl.term_history():
        return tl.flush_lsn
    held = tl.acceptor.term_history()
    common = find_highest_common_point(h, held, tl.flush_lsn)
    start = h[0].start_lsn if common is None else common.lsn
    before = tl.flush_lsn
    tl.acceptor.handle_proposer_elected(ProposerElected(term, start, tuple(h)))
    tl.compute = None  # the old term's compute is fenced off; the new one's is learnt from peers
    tl.persist()
    if start < before:
        log.warning("timeline %s: joined term %d; truncated divergent WAL %s..%s (not on the term's quorum)",
                    tl.timeline_id, term, format_lsn(start), format_lsn(before))
    else:
        log.info("timeline %s: joined term %d at %s", tl.timeline_id, term, format_lsn(start))
    return start


async def fetch_info(http: aiohttp.ClientSession, addr: str, timeline_id: str) -> dict | None:
    try:
        async with http.get(f"http://{addr}/v1/timeline/{timeline_id}",
                            timeout=aiohttp.ClientTimeout(total=3)) as r:
            if r.status != 200:
                return None
            info = await r.json()
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
        return None
    info["address"] = addr
    return info


async def pull_wal(tl: SkTimeline, http: aiohttp.ClientSession, addr: str, term: int, up_to: int) -> int:
    """Fetch WAL of `term` from the peer at `addr` until our flush LSN reaches `up_to` (or the peer's end)."""
    while tl.flush_lsn < up_to:
        async with tl.append_lock:
            if tl.term != term or not tl.in_term:
                raise RecoveryStopped(f"term changed to {tl.term} while recovering term {term}")
            start = tl.write_lsn
            params = {"start": start, "upto": "flush", "term": term, "max": min(CHUNK, max(up_to - start, 8192))}
            try:
                async with http.get(f"http://{addr}/v1/timeline/{tl.timeline_id}/wal", params=params,
                                    timeout=aiohttp.ClientTimeout(total=30)) as r:
                    if r.status != 200:
                        raise RecoveryStopped(f"peer {addr} refused WAL from {format_lsn(start)}: "
                                              f"{(await r.text())[:200]}")
                    data = await r.read()
                    peer_commit = int(r.headers.get("X-Commit-Lsn", 0))
                    peer_llt = int(r.headers.get("X-Last-Log-Term", -1))
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                raise RecoveryStopped(f"peer {addr} unreachable: {e}") from None
            if not data:
                break
            if tl.term != term:
                raise RecoveryStopped(f"term changed to {tl.term} while recovering term {term}")
            try:
                tl.append(start, data)
            except WalDecodeError as e:
                log.warning("timeline %s: WAL from %s at %s is not valid (%s); cutting our tail and retrying",
                            tl.timeline_id, addr, format_lsn(start), e)
                tl.truncate(tl.flush_lsn)
                continue
            write_lsn, record_lsn = tl.write_lsn, tl.record_lsn
            await asyncio.to_thread(tl.sync)
            tl.mark_synced(write_lsn, record_lsn)
            tl.update_commit(peer_commit, peer_last_log_term=peer_llt)
    return tl.flush_lsn


async def recover_from(tl: SkTimeline, http: aiohttp.ClientSession, donor: dict) -> None:
    """Join the donor's term if needed, then pull its WAL."""
    fresh = await fetch_info(http, donor["address"], tl.timeline_id)
    if fresh is None or not in_term(fresh) or fresh["term"] < tl.term:
        return
    term = fresh["term"]
    if not (tl.term == term and tl.in_term):
        async with tl.append_lock:
            join_term(tl, term, fresh["term_history"])
    if compute_news(tl.compute, fresh.get("compute")):  # the term's compute, or its detachment
        tl.compute = dict(fresh["compute"])
        tl.persist()
    if rank(fresh) > (tl.last_log_term, tl.flush_lsn):
        before = tl.flush_lsn
        end = await pull_wal(tl, http, fresh["address"], term, fresh["flush_lsn"])
        if end > before:
            log.info("timeline %s: recovered %s..%s from peer %s (term %d)", tl.timeline_id, format_lsn(before),
                     format_lsn(end), fresh["address"], term)


async def repair(broken: BrokenTimeline, http: aiohttp.ClientSession, peer_addrs: list[str]) -> SkTimeline:
    """Rebuild a damaged timeline from its healthiest peer; the WAL is then pulled by normal recovery.

    The damaged copy is discarded: its WAL and (if readable) all but its term. The term is kept
    when known, so a vote this safekeeper gave is never given again.
    """
    infos = [i for i in await asyncio.gather(*(fetch_info(http, a, broken.timeline_id) for a in peer_addrs))
             if i is not None and not i.get("corrupt")]
    if not infos:
        raise DaemonError(f"cannot repair timeline {broken.timeline_id}: no healthy peer answers",
                          hint="start the other safekeepers first")
    donor = max(infos, key=rank)
    term = max([i["term"] for i in infos] + ([broken.state.term] if broken.state else []))
    start = donor.get("wal_start_lsn", donor["timeline_start_lsn"])
    state = TimelineState(
        timeline_id=broken.timeline_id, system_id=donor["system_id"], pg_version=donor["pg_version"],
        term=term, term_history=[TermSwitch(t, lsn) for t, lsn in donor["term_history"]],
        timeline_start_lsn=start, flush_lsn=start, commit_lsn=start,
        remote_consistent_lsn=donor.get("remote_consistent_lsn", 0), backup_lsn=donor.get("backup_lsn", 0),
        compute=donor.get("compute"))
    if state.term_history and state.term_history[-1].term > term:
        raise Conflict("peer history is ahead of its term")  # cannot happen: TimelineState checks it too
    wal_dir = broken.dir / "wal"
    if wal_dir.exists():
        await asyncio.to_thread(shutil.rmtree, wal_dir)
    tl = SkTimeline.create(broken.dir, state)
    assert (broken.dir / CONTROL_FILE).exists()
    log.warning("timeline %s: repaired from peer %s: term %d, WAL from %s to be pulled up to %s",
                broken.timeline_id, donor["address"], term, format_lsn(start), format_lsn(donor["flush_lsn"]))
    return tl
