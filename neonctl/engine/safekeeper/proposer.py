"""The proposer's election: from a quorum of votes to a term history and a recovery plan.

In Neon the proposer is the walproposer inside the compute. A vanilla
Postgres cannot run one, so neonctl runs the election in the CLI process at
``endpoint start`` and then hands the compute's stream to the safekeepers.
This module is that election without any I/O; an async driver sends the
``VoteRequest``s and feeds the answers in with ``Election.add_vote``.

With N safekeepers a quorum is N//2+1; two quorums always share a
safekeeper, and a safekeeper votes at most once per term, so at most one
proposer per term is ever elected. A proposer of a lower term may still hold
old votes, but it is fenced: the quorum that elected the higher term now
refuses its appends, so it can commit nothing.

Once elected, the proposer must continue from a log that contains every
committed byte. Each committed byte is on a quorum, which intersects the
voters, so the voter with the most advanced log has them all: the *donor*,
the highest (last_log_term, flush_lsn). Its WAL is the new base: the new
term history is the donor's history up to its flush LSN followed by
``(new term, donor flush LSN)``, and the new term's WAL starts at that LSN.
Every acceptor is then told (``ProposerElected``) where its WAL diverges from
that history; it truncates there and receives the missing WAL, first the
stretch up to the donor's flush LSN fetched from the donor, then the new
term's stream.

Commit rule: ``commit_lsn`` is the highest LSN flushed on a quorum of
acceptors *in the current term*, and, as in Raft, flush positions below the
term's start LSN do not count. WAL of an earlier term is committed only
indirectly, once the new term's own WAL on top of it reaches a quorum: until
then an acceptor that holds it may still have an older last log term and lose
a later election to a divergent log, which would then truncate it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from neonctl.engine.lsn import format_lsn
from neonctl.engine.safekeeper.acceptor import ProposerElected, VoteResponse
from neonctl.engine.safekeeper.term_history import (
    CommonPoint,
    ProtocolViolation,
    TermHistory,
    find_highest_common_point,
)
from neonctl.errors import Conflict

SafekeeperId = int


def quorum(n: int) -> int:
    """How many of ``n`` safekeepers form a majority."""
    if n < 1:
        raise ValueError(f"a timeline needs at least one safekeeper, not {n}")
    return n // 2 + 1


def commit_lsn(flush_lsns: Iterable[int], n: int, *, term_start_lsn: int = 0) -> int:
    """The highest LSN flushed on a quorum of the ``n`` safekeepers; 0 if none is.

    ``flush_lsns`` are the flush positions acked *in the current term* (after
    ProposerElected), at most one per safekeeper; positions below
    ``term_start_lsn`` are not counted (see the commit rule above).
    """
    counted = list(flush_lsns)
    if len(counted) > n:
        raise ValueError(f"{len(counted)} flush positions for {n} safekeepers")
    counted = sorted((lsn for lsn in counted if lsn >= term_start_lsn), reverse=True)
    q = quorum(n)
    return counted[q - 1] if len(counted) >= q else 0


@dataclass(frozen=True)
class AcceptorPlan:
    """What one acceptor must do to join the elected term.

    Truncate WAL at ``start_streaming_at`` (it is sent in ProposerElected),
    then receive ``[fetch_from, fetch_to)`` from the donor (empty when equal),
    then the new term's WAL.
    """

    sk_id: SafekeeperId
    common_point: CommonPoint | None  # None: no common term; stream from the start
    start_streaming_at: int
    fetch_from: int
    fetch_to: int

    @property
    def needs_recovery(self) -> bool:
        return self.fetch_from < self.fetch_to


@dataclass(frozen=True)
class ElectionResult:
    term: int
    donor: SafekeeperId
    start_lsn: int  # the donor's flush LSN: where the new term's WAL begins
    term_history: TermHistory  # donor's history + (term, start_lsn)
    per_acceptor_plan: dict[SafekeeperId, AcceptorPlan] = field(default_factory=dict)
    truncate_lsn: int = 0  # highest commit_lsn reported by a voter

    def plan_for(self, sk_id: SafekeeperId, vote: VoteResponse) -> AcceptorPlan:
        """The plan for an acceptor from its VoteResponse (also for one that answers late)."""
        theirs = TermHistory(vote.term_history).up_to(vote.flush_lsn)
        point = find_highest_common_point(self.term_history, theirs, vote.flush_lsn)
        start_at = self.term_history[0].start_lsn if point is None else point.lsn
        if start_at < vote.truncate_lsn:
            raise ProtocolViolation(
                f"safekeeper {sk_id} would be truncated to {format_lsn(start_at)}, below its commit_lsn "
                f"{format_lsn(vote.truncate_lsn)}"
            )
        return AcceptorPlan(sk_id, point, start_at, start_at, max(start_at, self.start_lsn))

    def proposer_elected(self, sk_id: SafekeeperId) -> ProposerElected:
        """The ProposerElected message for an acceptor that has a plan."""
        plan = self.per_acceptor_plan[sk_id]
        return ProposerElected(self.term, plan.start_streaming_at, tuple(self.term_history))


class Election:
    """Collects votes for one term of one timeline with ``n`` safekeepers."""

    def __init__(self, term: int, n: int):
        if term < 1:
            raise ValueError(f"terms start at 1, not {term}")
        self.term = term
        self.n = n
        self.quorum = quorum(n)
        self.superseded_by: int | None = None  # a higher term some acceptor reported
        self._votes: dict[SafekeeperId, VoteResponse] = {}
        self._joined: dict[SafekeeperId, VoteResponse] = {}  # already in our term, no vote
        self._result: ElectionResult | None = None

    @property
    def votes(self) -> dict[SafekeeperId, VoteResponse]:
        return dict(self._votes)

    def add_vote(self, sk_id: SafekeeperId, resp: VoteResponse) -> None:
        """Record an acceptor's answer to our VoteRequest.

        A refusal carrying a higher term supersedes this election. A refusal
        in our own term (the acceptor already voted in it, e.g. for us before
        a reconnect) is not a vote, but once we are elected it may join.
        """
        if resp.vote_given:
            if resp.term != self.term:
                raise ProtocolViolation(
                    f"safekeeper {sk_id} voted for term {resp.term} in election of term {self.term}"
                )
            self._joined.pop(sk_id, None)
            self._votes[sk_id] = resp
            if len(self._votes) > self.n:
                raise ProtocolViolation(f"{len(self._votes)} votes for a timeline with {self.n} safekeepers")
        elif resp.term > self.term:
            self.superseded_by = max(resp.term, self.superseded_by or 0)
            return
        elif resp.term == self.term:
            if sk_id not in self._votes:
                self._joined[sk_id] = resp
        else:
            raise ProtocolViolation(f"safekeeper {sk_id} refused term {self.term} while at lower term {resp.term}")
        if self._result is not None:
            self._result.per_acceptor_plan[sk_id] = self._result.plan_for(sk_id, resp)

    def is_won(self) -> bool:
        return self.superseded_by is None and len(self._votes) >= self.quorum

    def result(self) -> ElectionResult:
        """The outcome, fixed the first time it is asked for; raises Conflict if not won."""
        if self.superseded_by is not None:
            raise Conflict(f"election of term {self.term} was superseded by term {self.superseded_by}")
        if self._result is None:
            if not self.is_won():
                raise Conflict(f"term {self.term} is not elected: {len(self._votes)} of {self.quorum} votes needed")
            self._result = self._decide()
        return self._result

    def _decide(self) -> ElectionResult:
        def rank(sk_id: SafekeeperId) -> tuple[int, int]:
            v = self._votes[sk_id]
            return (v.last_log_term, v.flush_lsn)

        donor = max(sorted(self._votes), key=rank)  # ties go to the lowest id
        vote = self._votes[donor]
        base = TermHistory(vote.term_history).up_to(vote.flush_lsn)
        if base:
            start_lsn = vote.flush_lsn
        else:  # a fresh timeline: no term has written WAL yet
            start_lsn = max(vote.flush_lsn, *(v.timeline_start_lsn for v in self._votes.values()))
        if base.last_term >= self.term:
            raise ProtocolViolation(f"donor {donor} has WAL of term {base.last_term}, not below {self.term}")
        truncate_lsn = max(v.truncate_lsn for v in self._votes.values())
        if start_lsn < truncate_lsn:
            raise ProtocolViolation(
                f"donor {donor} ends at {format_lsn(start_lsn)}, below commit_lsn {format_lsn(truncate_lsn)} "
                "reported by a voter"
            )
        result = ElectionResult(
            term=self.term,
            donor=donor,
            start_lsn=start_lsn,
            term_history=base.extended(self.term, start_lsn),
            truncate_lsn=truncate_lsn,
        )
        for sk_id, resp in (*self._votes.items(), *self._joined.items()):
            result.per_acceptor_plan[sk_id] = result.plan_for(sk_id, resp)
        return result
