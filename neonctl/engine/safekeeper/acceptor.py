"""The acceptor: a safekeeper's side of the consensus on one timeline's WAL.

The protocol is Paxos with Raft's log rules, as in Neon. A proposer that wants
to stream WAL picks a term and asks every safekeeper for a vote. An acceptor
votes only for a term above any it has seen, and writes that term to its
control file *before* it answers, so even across restarts it votes at most
once per term. With votes from a quorum (N//2+1) the proposer is elected; the
votes carry each acceptor's WAL end and term history, from which it picks the
most advanced log as the base of its own.

``ProposerElected`` then tells each acceptor the proposer's term history and
where its WAL starts to diverge from it. The acceptor recomputes that point
itself, truncates its WAL there (never below ``commit_lsn``, which would lose
acknowledged commits), adopts the history and from then on accepts
``AppendRequest``s of that term, each of which must continue exactly at its
WAL end. Any message from a lower term gets the current term back instead,
which is how a stale proposer learns it was superseded.

This module is sans-I/O. The acceptor reaches durable storage only through
``AcceptorStorage`` (persist the control state, truncate WAL, report the WAL
end) and never writes WAL itself: ``handle_append_request`` returns a
``WalWrite`` for the caller to write and fsync, and ``complete_append`` turns
the durable write into the ``AppendResponse`` that acks it. The caller handles
one message of a timeline at a time, each append through to
``complete_append``, whatever connection the messages came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from neonctl.engine.lsn import format_lsn
from neonctl.engine.safekeeper.control_file import TimelineState
from neonctl.engine.safekeeper.term_history import (
    ProtocolViolation,
    TermHistory,
    TermSwitch,
    find_highest_common_point,
)

__all__ = [
    "Acceptor",
    "AcceptorStorage",
    "AppendRequest",
    "AppendResponse",
    "ProposerElected",
    "ProtocolViolation",
    "VoteRequest",
    "VoteResponse",
    "WalWrite",
]


class AcceptorStorage(Protocol):
    """What the acceptor needs from disk; tests pass an in-memory fake."""

    def persist(self, state: TimelineState) -> None:
        """Durably replace the control file with ``state`` (returns once fsynced)."""

    def truncate_wal(self, lsn: int) -> None:
        """Durably cut WAL so that it ends at ``lsn``; on empty WAL, begin it at ``lsn``."""

    def flush_lsn(self) -> int:
        """The end of WAL that is durable on disk."""


def _as_switches(history: object) -> tuple[TermSwitch, ...]:
    return tuple(TermSwitch(int(t), int(lsn)) for t, lsn in history)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class VoteRequest:
    term: int


@dataclass(frozen=True)
class VoteResponse:
    term: int  # the acceptor's term after handling the request
    vote_given: bool
    flush_lsn: int
    truncate_lsn: int  # the acceptor's commit_lsn: nothing below may be truncated
    term_history: tuple[TermSwitch, ...]  # up to flush_lsn: the WAL actually held
    timeline_start_lsn: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "term_history", _as_switches(self.term_history))

    @property
    def last_log_term(self) -> int:
        return TermHistory(self.term_history).up_to(self.flush_lsn).last_term


@dataclass(frozen=True)
class ProposerElected:
    term: int
    start_streaming_at: int  # the divergence point for this acceptor
    term_history: tuple[TermSwitch, ...]  # the proposer's history, ending with its own term

    def __post_init__(self) -> None:
        object.__setattr__(self, "term_history", _as_switches(self.term_history))


@dataclass(frozen=True)
class AppendRequest:
    term: int
    begin_lsn: int
    end_lsn: int
    commit_lsn: int  # the proposer's commit_lsn, which may be beyond end_lsn
    wal_data: bytes = b""  # empty for a heartbeat that only carries commit_lsn


@dataclass(frozen=True)
class AppendResponse:
    term: int  # above the proposer's term means: you were superseded
    flush_lsn: int
    commit_lsn: int


@dataclass(frozen=True)
class WalWrite:
    """WAL the caller must write at ``begin_lsn`` and fsync before ``complete_append``."""

    term: int
    begin_lsn: int
    end_lsn: int
    wal_data: bytes
    commit_lsn: int


class Acceptor:
    """The acceptor state machine for one timeline on one safekeeper."""

    def __init__(self, state: TimelineState, storage: AcceptorStorage):
        self._state = state.copy()
        self._adopted = TermHistory(state.term_history)
        self._storage = storage
        # Where the current term's WAL starts. commit_lsn reaching it is
        # persisted at once: from then on the control file alone shows that
        # the term's start is committed (what a sync-safekeepers step waits for).
        self._term_start_lsn = state.term_history[-1].start_lsn if state.term_history else 0
        self._dirty = False

    # -- read-only views -------------------------------------------------

    @property
    def state(self) -> TimelineState:
        """The in-memory state (a copy; it may be ahead of the control file)."""
        return self._state.copy()

    @property
    def term(self) -> int:
        return self._state.term

    @property
    def commit_lsn(self) -> int:
        return self._state.commit_lsn

    def flush_lsn(self) -> int:
        return self._storage.flush_lsn()

    def term_history(self) -> TermHistory:
        """The history of the WAL actually held (the adopted one may run ahead)."""
        return self._adopted.up_to(self.flush_lsn())

    def adopted_term_history(self) -> TermHistory:
        """The history adopted from the last ProposerElected; may run ahead of the WAL."""
        return self._adopted

    def last_log_term(self) -> int:
        return self.term_history().last_term

    # -- messages ----------------------------------------------------------

    def handle(self, msg: VoteRequest | ProposerElected | AppendRequest) -> VoteResponse | AppendResponse | WalWrite:
        """Dispatch one proposer message."""
        if isinstance(msg, VoteRequest):
            return self.handle_vote_request(msg)
        if isinstance(msg, ProposerElected):
            return self.handle_proposer_elected(msg)
        if isinstance(msg, AppendRequest):
            return self.handle_append_request(msg)
        raise TypeError(f"not a proposer message: {msg!r}")

    def handle_vote_request(self, req: VoteRequest) -> VoteResponse:
        """Vote for ``req.term`` if it is above our term; the vote is durable before we answer."""
        vote_given = req.term > self._state.term
        if vote_given:
            new = self._state.copy()
            new.term = req.term
            self._persist(new)
        flush = self.flush_lsn()
        return VoteResponse(
            term=self._state.term,
            vote_given=vote_given,
            flush_lsn=flush,
            truncate_lsn=self._state.commit_lsn,
            term_history=tuple(self.term_history()),
            timeline_start_lsn=self._state.timeline_start_lsn,
        )

    def handle_proposer_elected(self, msg: ProposerElected) -> AppendResponse:
        """Join the elected proposer's term: truncate divergent WAL, adopt its history.

        A message from a lower term is answered with our term and ignored. A
        start point that disagrees with ours, or that would cut committed
        WAL, raises ProtocolViolation and changes nothing.
        """
        if msg.term < self._state.term:
            return self._append_response()
        history = TermHistory(msg.term_history)
        if not history or history.last_term != msg.term:
            raise ProtocolViolation(
                f"ProposerElected for term {msg.term} carries a history that does not end in it: {history!r}"
            )
        flush = self.flush_lsn()
        mine = self.term_history()
        common = find_highest_common_point(history, mine, flush)
        expected = history[0].start_lsn if common is None else common.lsn
        if msg.start_streaming_at != expected:
            raise ProtocolViolation(
                f"ProposerElected for term {msg.term} starts streaming at "
                f"{format_lsn(msg.start_streaming_at)}, but our histories diverge at {format_lsn(expected)} "
                f"(our history {mine!r}, flush {format_lsn(flush)}; proposer's {history!r})"
            )
        if msg.start_streaming_at < self._state.commit_lsn:
            raise ProtocolViolation(
                f"ProposerElected for term {msg.term} would truncate committed WAL: start "
                f"{format_lsn(msg.start_streaming_at)} is below commit_lsn {format_lsn(self._state.commit_lsn)}"
            )
        if msg.start_streaming_at > flush and mine:
            raise ProtocolViolation(
                f"ProposerElected for term {msg.term} starts at {format_lsn(msg.start_streaming_at)}, "
                f"past our WAL end {format_lsn(flush)}: that would leave a gap"
            )
        if msg.term > self._state.term:
            # Accepting the term is a vote: make it durable before touching WAL.
            new = self._state.copy()
            new.term = msg.term
            self._persist(new)
        self._storage.truncate_wal(msg.start_streaming_at)
        new = self._state.copy()
        new.term_history = history.to_list()
        if new.timeline_start_lsn == 0:
            new.timeline_start_lsn = history[0].start_lsn
        if new.peer_horizon_lsn == 0:
            new.peer_horizon_lsn = new.timeline_start_lsn
        new.flush_lsn = self.flush_lsn()
        new.commit_lsn = max(new.commit_lsn, min(new.timeline_start_lsn, new.flush_lsn))
        self._persist(new)
        self._term_start_lsn = history[-1].start_lsn
        return self._append_response()

    def handle_append_request(self, req: AppendRequest) -> AppendResponse | WalWrite:
        """Check an append; a stale term gets a refusal, a valid one the WAL to write."""
        if req.term < self._state.term:
            return self._append_response()
        history = self._state.term_history
        if req.term > self._state.term or not history or history[-1].term != req.term:
            raise ProtocolViolation(
                f"AppendRequest for term {req.term} before ProposerElected of that term (our term {self._state.term})"
            )
        if req.end_lsn - req.begin_lsn != len(req.wal_data):
            raise ProtocolViolation(
                f"AppendRequest [{format_lsn(req.begin_lsn)}, {format_lsn(req.end_lsn)}) "
                f"carries {len(req.wal_data)} bytes"
            )
        flush = self.flush_lsn()
        if req.begin_lsn != flush:
            what = "rewrites WAL already held" if req.begin_lsn < flush else "leaves a gap after"
            raise ProtocolViolation(
                f"AppendRequest at {format_lsn(req.begin_lsn)} {what} our WAL end {format_lsn(flush)}"
            )
        return WalWrite(req.term, req.begin_lsn, req.end_lsn, req.wal_data, req.commit_lsn)

    def complete_append(self, write: WalWrite) -> AppendResponse:
        """The caller made ``write`` durable: advance commit_lsn and ack it."""
        if write.term != self._state.term:
            raise ProtocolViolation(
                f"WAL write of term {write.term} completed in term {self._state.term}: messages of a "
                "timeline must be handled one at a time, each append through to complete_append"
            )
        flush = self.flush_lsn()
        if flush < write.end_lsn:
            raise ProtocolViolation(
                f"WAL write up to {format_lsn(write.end_lsn)} is not durable: WAL ends at {format_lsn(flush)}"
            )
        self._state.flush_lsn = flush
        self._dirty = True
        self.update_commit_lsn(write.commit_lsn)
        return self._append_response()

    # -- bookkeeping -------------------------------------------------------

    def update_commit_lsn(self, lsn: int, *, peer_last_log_term: int | None = None) -> int:
        """Raise commit_lsn towards ``lsn``, capped by our WAL end; never lowers it.

        From the proposer (same term, WAL checked by ProposerElected) the cap
        is enough. A peer's commit_lsn is only taken when the peer's last log
        term equals ours: otherwise our WAL below it may be a divergent tail.
        """
        if peer_last_log_term is not None and peer_last_log_term != self.last_log_term():
            return self._state.commit_lsn
        new = min(max(lsn, self._state.commit_lsn), self.flush_lsn())
        if new <= self._state.commit_lsn:
            return self._state.commit_lsn
        crossed_term_start = self._state.commit_lsn < self._term_start_lsn <= new
        self._state.commit_lsn = new
        self._dirty = True
        if crossed_term_start:
            self.checkpoint()
        return new

    def checkpoint(self) -> None:
        """Persist in-memory progress (flush hint, commit_lsn) if it changed."""
        if self._dirty:
            new = self._state.copy()
            new.flush_lsn = self.flush_lsn()
            self._persist(new)

    def _persist(self, new: TimelineState) -> None:
        # Persist first: if it fails, memory still matches the control file.
        self._storage.persist(new.copy())
        self._state = new
        self._adopted = TermHistory(new.term_history)
        self._dirty = False

    def _append_response(self) -> AppendResponse:
        return AppendResponse(term=self._state.term, flush_lsn=self.flush_lsn(), commit_lsn=self._state.commit_lsn)
