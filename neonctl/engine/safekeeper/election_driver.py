"""The proposer at `endpoint start`: an election over the safekeepers' HTTP API, then recovery.

Vanilla Postgres has no walproposer, so the CLI process that starts a compute
runs the election (``proposer.Election``) before it materialises anything:

1. Read every safekeeper's term; propose ``max + 1``.
2. ``POST /vote`` to all of them at once. Each voter stops streaming from the
   old compute (fencing it off), cuts a partial record at its WAL end, makes
   the vote durable and answers with its flush LSN, commit LSN and term
   history. A quorum of votes elects us; a refusal carrying a higher term,
   or too few votes because a concurrent start took them, is a clear error.
3. The donor is the voter with the highest (last_log_term, flush_lsn); the
   new term starts at its flush LSN and the term history is the donor's
   followed by (term, start_lsn).
4. ``POST /elected`` (ProposerElected) to every voter: each truncates WAL
   past the highest common point of its history and ours, never below its
   commit_lsn, and adopts the history. Voters behind the donor then pull the
   missing WAL from it (``POST /recover``).
5. Once a quorum holds WAL up to start_lsn, it is committed (the term's
   first "record" is on a quorum), so ``POST /commit`` lets the pageserver
   read up to there; once it has, the compute is materialised at start_lsn and started
   with ``neonctl.term`` set, and ``attach`` hands it to the safekeepers,
   which stream only from a compute of their own term.

Safekeepers that were unreachable catch up by peer recovery when they return.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from neonctl.engine.lsn import format_lsn
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.project import Project
from neonctl.engine.safekeeper.acceptor import VoteResponse
from neonctl.engine.safekeeper.client import SafekeeperClient
from neonctl.engine.safekeeper.proposer import Election, quorum
from neonctl.engine.safekeeper.term_history import TermSwitch
from neonctl.errors import Conflict, CorruptData, DaemonError, NeonctlError, Timeout


@dataclass
class ElectionOutcome:
    timeline_id: str
    term: int
    start_lsn: int  # where the new term's WAL begins: the compute is materialised here
    donor: int
    term_history: list[tuple[int, int]]
    members: list[int]  # safekeepers that joined the term holding WAL up to start_lsn
    unreachable: dict[int, str] = field(default_factory=dict)


def _parallel(calls: dict[int, Callable[[], dict]]) -> tuple[dict[int, dict], dict[int, NeonctlError]]:
    ok: dict[int, dict] = {}
    failed: dict[int, NeonctlError] = {}
    if len(calls) <= 1:  # a project's only safekeeper: no thread to start
        for sk, fn in calls.items():
            try:
                ok[sk] = fn()
            except NeonctlError as e:
                failed[sk] = e
        return ok, failed
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = {sk: pool.submit(fn) for sk, fn in calls.items()}
        for sk, fut in futures.items():
            try:
                ok[sk] = fut.result()
            except NeonctlError as e:
                failed[sk] = e
    return ok, failed


def _errors(failed: dict[int, NeonctlError]) -> str:
    return "; ".join(f"sk{k}: {v.message}" for k, v in sorted(failed.items()))


def _hint(failed: dict[int, NeonctlError], default: str) -> str:
    """A damaged timeline's own hint (how to repair it) beats the generic one."""
    return next((e.hint for _, e in sorted(failed.items()) if isinstance(e, CorruptData) and e.hint), default)


def elect(project: Project, timeline_id: str, progress: Callable[[str], None] = lambda m: None,
          term: int | None = None) -> ElectionOutcome:
    """Win an election for a new term on the timeline and bring a quorum to the new term's start."""
    sks = SafekeeperClient.all_of(project)
    n = len(sks)
    q = quorum(n)
    if term is None:
        infos, failed = _parallel({sk: (lambda c=c: c.timeline(timeline_id, timeout=5)) for sk, c in sks.items()})
        if len(infos) < q:
            raise DaemonError(f"only {len(infos)} of {n} safekeepers are reachable, {q} needed to start a compute: "
                              f"{_errors(failed)}", hint=_hint(failed, "neonctl safekeeper list"))
        term = max(i["term"] for i in infos.values()) + 1
    progress(f"electing term {term} on {n} safekeeper(s) (quorum {q}) ...")
    votes, failed = _parallel({sk: (lambda c=c: c.vote(timeline_id, term, timeout=10)) for sk, c in sks.items()})
    election = Election(term, n)
    for sk, v in votes.items():
        election.add_vote(sk, VoteResponse(
            term=v["term"], vote_given=v["vote_given"], flush_lsn=v["flush_lsn"], truncate_lsn=v["truncate_lsn"],
            term_history=tuple(TermSwitch(t, lsn) for t, lsn in v["term_history"]),
            timeline_start_lsn=v["timeline_start_lsn"]))
    if election.superseded_by is not None:
        raise Conflict(f"another endpoint start on this branch took over: a safekeeper is already at term "
                       f"{election.superseded_by}, above our term {term}", hint="try again")
    if not election.is_won():
        given = sum(1 for v in votes.values() if v["vote_given"])
        if given + len(failed) < n:  # someone else took the votes we did not get
            raise Conflict(f"lost the election for term {term} to a concurrent endpoint start on this branch "
                           f"({given} of {q} votes)", hint="only one compute can write to a branch")
        raise DaemonError(f"election for term {term} failed: {given} of {q} votes needed; {_errors(failed)}",
                          hint=_hint(failed, "start more safekeepers: `neonctl safekeeper start N`"))
    result = election.result()
    donor_addr = sks[result.donor].address
    history = [[e.term, e.start_lsn] for e in result.term_history]
    progress(f"term {term} elected; donor sk{result.donor}, WAL continues at {format_lsn(result.start_lsn)}")

    def join(sk: int) -> dict:
        plan = result.per_acceptor_plan[sk]
        info = sks[sk].elected(timeline_id, term, plan.start_streaming_at, history)
        if info["flush_lsn"] < result.start_lsn:
            info = sks[sk].recover(timeline_id, term, donor_addr, result.start_lsn)
        return info

    # The donor first: the others pull from it, and it serves WAL of term T only once it joined T.
    joined, join_failed = _parallel({result.donor: lambda: join(result.donor)})
    if result.donor in joined:
        more, more_failed = _parallel({sk: (lambda sk=sk: join(sk)) for sk in result.per_acceptor_plan
                                       if sk != result.donor})
        joined.update(more)
        join_failed.update(more_failed)
    members = sorted(sk for sk, info in joined.items() if info["flush_lsn"] >= result.start_lsn)
    if len(members) < q:
        raise DaemonError(f"term {term} elected but only {len(members)} safekeeper(s) reached its start "
                          f"{format_lsn(result.start_lsn)}, {q} needed: {_errors(join_failed)}")
    _parallel({sk: (lambda sk=sk: sks[sk].commit(timeline_id, term, result.start_lsn, timeout=10)) for sk in members})
    wait_ingested(project, timeline_id, result.start_lsn)
    unreachable = {sk: e.message for sk, e in {**failed, **join_failed}.items()}
    return ElectionOutcome(timeline_id, term, result.start_lsn, result.donor,
                           [tuple(h) for h in history], members, unreachable)


def wait_ingested(project: Project, timeline_id: str, lsn: int, timeout: float = 60.0) -> None:
    """Wait until the pageserver holds complete records up to `lsn` (the new term's start).

    The safekeepers serve it only committed WAL, so this is also the moment the term's start is
    readable; a data directory asked for then is exactly at `lsn`.
    """
    pageserver = PageserverClient.of(project)
    deadline = time.monotonic() + timeout
    while True:
        info = pageserver.timeline(timeline_id)
        if info["last_record_lsn"] >= lsn:
            return
        if time.monotonic() > deadline:
            raise Timeout(f"the pageserver has WAL up to {format_lsn(info['last_record_lsn'])} of timeline "
                          f"{timeline_id}, waited {timeout:.0f}s for {format_lsn(lsn)}")
        time.sleep(0.05)


def attach(project: Project, outcome: ElectionOutcome, socket_dir: str, port: int, lsn: int) -> list[int]:
    """Hand the compute of the elected term to the safekeepers; a quorum must take it. They stream over the
    compute's Unix socket (`socket_dir`), which it trusts; its TCP port wants a password."""
    if lsn != outcome.start_lsn:
        raise Conflict(f"the compute was materialised at {format_lsn(lsn)}, not at the start of term "
                       f"{outcome.term} ({format_lsn(outcome.start_lsn)})")
    sks = SafekeeperClient.all_of(project)
    body = {"term": outcome.term, "host": socket_dir, "port": port, "user": "postgres", "start_lsn": lsn}
    ok, failed = _parallel({sk: (lambda c=c: c.attach_compute(outcome.timeline_id, body)) for sk, c in sks.items()})
    if len(ok) < quorum(len(sks)):
        raise DaemonError(f"only {len(ok)} safekeeper(s) took the compute of term {outcome.term}: {_errors(failed)}")
    return sorted(ok)
