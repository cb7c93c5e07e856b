"""The acceptor state machine against an in-memory storage."""

from __future__ import annotations

import pytest

from neonctl.engine.safekeeper.acceptor import (
    Acceptor,
    AppendRequest,
    AppendResponse,
    ProposerElected,
    ProtocolViolation,
    VoteRequest,
    VoteResponse,
    WalWrite,
)
from neonctl.engine.safekeeper.control_file import TimelineState, decode, encode
from neonctl.engine.safekeeper.term_history import TermSwitch

TLI = "ab" * 16
START = 0x100


class PowerLoss(Exception):
    pass


class MemStorage:
    """WAL as bytes from START, control file as encoded bytes; every call is durable."""

    def __init__(self, start: int = START):
        self.start = start
        self.wal = bytearray()
        self.control: bytes | None = None
        self.persists = 0
        self.fail_persist = False
        self.log: list[str] = []

    def persist(self, state: TimelineState) -> None:
        if self.fail_persist:
            raise PowerLoss()
        self.control = encode(state)
        self.persists += 1
        self.log.append(f"persist term={state.term}")

    def truncate_wal(self, lsn: int) -> None:
        assert self.start <= lsn <= self.flush_lsn() or not self.wal
        if not self.wal:
            self.start = lsn
        del self.wal[lsn - self.start :]
        self.log.append(f"truncate {lsn:#x}")

    def flush_lsn(self) -> int:
        return self.start + len(self.wal)

    def write(self, w: WalWrite) -> None:
        assert w.begin_lsn == self.flush_lsn()
        self.wal += w.wal_data

    def durable_state(self) -> TimelineState:
        assert self.control is not None
        return decode(self.control)


def new_acceptor(storage: MemStorage | None = None, **kw) -> tuple[Acceptor, MemStorage]:
    storage = storage or MemStorage()
    state = TimelineState(
        timeline_id=TLI, system_id=42, pg_version=17, timeline_start_lsn=START, flush_lsn=START, commit_lsn=START
    )
    for k, v in kw.items():
        setattr(state, k, v)
    storage.persist(state)
    storage.persists = 0
    storage.log.clear()
    return Acceptor(state, storage), storage


def restart(storage: MemStorage) -> Acceptor:
    return Acceptor(storage.durable_state(), storage)


def append(acc: Acceptor, storage: MemStorage, term: int, data: bytes, commit: int = 0) -> AppendResponse:
    begin = storage.flush_lsn()
    out = acc.handle_append_request(AppendRequest(term, begin, begin + len(data), commit, data))
    if isinstance(out, AppendResponse):
        return out
    storage.write(out)
    return acc.complete_append(out)


def elect(acc: Acceptor, term: int, history, start: int) -> AppendResponse:
    assert acc.handle_vote_request(VoteRequest(term)).vote_given
    return acc.handle_proposer_elected(ProposerElected(term, start, tuple(history)))


# -- voting -------------------------------------------------------------


def test_votes_for_a_higher_term_and_persists_it_first():
    acc, storage = new_acceptor()
    resp = acc.handle_vote_request(VoteRequest(3))
    assert resp == VoteResponse(
        term=3, vote_given=True, flush_lsn=START, truncate_lsn=START, term_history=(), timeline_start_lsn=START
    )
    assert storage.persists == 1 and storage.durable_state().term == 3


def test_never_votes_twice_in_a_term_even_after_restart():
    acc, storage = new_acceptor()
    assert acc.handle_vote_request(VoteRequest(3)).vote_given
    again = acc.handle_vote_request(VoteRequest(3))
    assert not again.vote_given and again.term == 3
    lower = acc.handle_vote_request(VoteRequest(2))
    assert not lower.vote_given and lower.term == 3
    acc = restart(storage)
    assert not acc.handle_vote_request(VoteRequest(3)).vote_given
    assert acc.handle_vote_request(VoteRequest(4)).vote_given
    assert storage.persists == 2


def test_vote_is_not_given_if_it_cannot_be_persisted():
    acc, storage = new_acceptor()
    storage.fail_persist = True
    with pytest.raises(PowerLoss):
        acc.handle_vote_request(VoteRequest(3))
    storage.fail_persist = False
    assert acc.term == 0
    assert restart(storage).term == 0


def test_vote_reports_only_the_history_of_wal_held():
    acc, storage = new_acceptor()
    elect(acc, 1, [(1, START)], START)
    append(acc, storage, 1, b"x" * 16, commit=START + 8)
    # adopt term 2's history that starts beyond our WAL end (recovery pending)
    acc.handle_proposer_elected(ProposerElected(2, START + 16, ((1, START), (2, START + 32))))
    resp = acc.handle_vote_request(VoteRequest(5))
    assert resp.term_history == (TermSwitch(1, START),)
    assert (resp.flush_lsn, resp.truncate_lsn, resp.last_log_term) == (START + 16, START + 8, 1)


# -- ProposerElected ----------------------------------------------------


def test_rfc013_divergent_tail_is_truncated():
    # A wrote 1.1 .. 1.4 in term 1 (one byte each); only 1.1 was committed.
    acc, storage = new_acceptor()
    elect(acc, 1, [(1, START)], START)
    append(acc, storage, 1, b"\x01\x01\x01\x01", commit=START + 1)
    assert acc.commit_lsn == START + 1
    # P3's history: term 2 began after 1.1, term 3 after 2.3.
    p3 = [(1, START), (2, START + 1), (3, START + 3)]
    storage.log.clear()
    resp = elect(acc, 3, p3, START + 1)
    assert resp == AppendResponse(term=3, flush_lsn=START + 1, commit_lsn=START + 1)
    assert storage.log == ["persist term=3", "truncate 0x101", "persist term=3"]
    assert storage.durable_state().term_history == p3
    assert acc.term_history() == [(1, START), (2, START + 1)]  # 2@START+1 has no bytes yet


def test_start_point_is_cross_checked():
    acc, storage = new_acceptor()
    elect(acc, 1, [(1, START)], START)
    append(acc, storage, 1, b"abcd")
    acc.handle_vote_request(VoteRequest(2))
    before = (acc.state, bytes(storage.wal), storage.persists)
    with pytest.raises(ProtocolViolation, match="diverge at 0/102"):
        acc.handle_proposer_elected(ProposerElected(2, START + 3, ((1, START), (2, START + 2))))
    assert (acc.state, bytes(storage.wal), storage.persists) == before


def test_never_truncates_below_commit_lsn():
    acc, storage = new_acceptor()
    elect(acc, 1, [(1, START)], START)
    append(acc, storage, 1, b"abcd", commit=START + 3)
    acc.handle_vote_request(VoteRequest(2))
    with pytest.raises(ProtocolViolation, match="would truncate committed WAL"):
        acc.handle_proposer_elected(ProposerElected(2, START + 2, ((1, START), (2, START + 2))))
    assert bytes(storage.wal) == b"abcd"


def test_proposer_elected_from_lower_term_is_ignored():
    acc, _ = new_acceptor()
    acc.handle_vote_request(VoteRequest(5))
    resp = acc.handle_proposer_elected(ProposerElected(4, START, ((4, START),)))
    assert resp.term == 5
    assert acc.state.term_history == []


def test_proposer_elected_of_a_higher_term_counts_as_a_vote():
    acc, storage = new_acceptor()
    resp = acc.handle_proposer_elected(ProposerElected(7, START, ((7, START),)))
    assert resp.term == 7 and storage.durable_state().term == 7
    assert not acc.handle_vote_request(VoteRequest(7)).vote_given


@pytest.mark.parametrize("history", [(), ((1, START),), ((1, START), (2, START + 1))])
def test_history_must_end_in_the_proposers_term(history):
    acc, _ = new_acceptor()
    acc.handle_vote_request(VoteRequest(3))
    with pytest.raises(ProtocolViolation, match="does not end in it"):
        acc.handle_proposer_elected(ProposerElected(3, START, history))


def test_empty_acceptor_starts_where_the_history_starts():
    acc, storage = new_acceptor(MemStorage(start=0))
    acc.handle_vote_request(VoteRequest(1))
    resp = acc.handle_proposer_elected(ProposerElected(1, 0x5000, ((1, 0x5000),)))
    assert resp.flush_lsn == 0x5000 and storage.start == 0x5000


def test_reelection_in_same_term_keeps_the_wal():
    acc, storage = new_acceptor()
    elect(acc, 2, [(2, START)], START)
    append(acc, storage, 2, b"abc")
    resp = acc.handle_proposer_elected(ProposerElected(2, START + 3, ((2, START),)))
    assert resp.flush_lsn == START + 3 and bytes(storage.wal) == b"abc"


# -- appends --------------------------------------------------------------


def test_append_writes_then_acks():
    acc, storage = new_acceptor()
    elect(acc, 1, [(1, START)], START)
    out = acc.handle_append_request(AppendRequest(1, START, START + 3, START + 10, b"abc"))
    assert out == WalWrite(1, START, START + 3, b"abc", START + 10)
    assert acc.flush_lsn() == START  # nothing written by the acceptor itself
    storage.write(out)
    assert acc.complete_append(out) == AppendResponse(1, START + 3, START + 3)  # commit capped by WAL end


def test_heartbeat_carries_commit_lsn():
    acc, storage = new_acceptor()
    elect(acc, 1, [(1, START)], START)
    append(acc, storage, 1, b"abcdef", commit=START + 2)
    assert append(acc, storage, 1, b"", commit=START + 5).commit_lsn == START + 5


def test_append_from_stale_term_is_refused_with_our_term():
    acc, storage = new_acceptor()
    elect(acc, 2, [(2, START)], START)
    resp = append(acc, storage, 1, b"zz")
    assert resp == AppendResponse(term=2, flush_lsn=START, commit_lsn=START)
    assert storage.wal == b""


def test_append_before_proposer_elected_is_a_violation():
    acc, storage = new_acceptor()
    with pytest.raises(ProtocolViolation, match="before ProposerElected"):
        append(acc, storage, 1, b"a")
    acc.handle_vote_request(VoteRequest(1))
    with pytest.raises(ProtocolViolation, match="before ProposerElected"):
        append(acc, storage, 1, b"a")


@pytest.mark.parametrize(
    "begin,end,data,match",
    [
        (START + 2, START + 4, b"ab", "rewrites WAL"),
        (START + 5, START + 6, b"a", "leaves a gap"),
        (START + 3, START + 6, b"ab", "carries 2 bytes"),
    ],
)
def test_appends_must_continue_at_wal_end(begin, end, data, match):
    acc, storage = new_acceptor()
    elect(acc, 1, [(1, START)], START)
    append(acc, storage, 1, b"abc")
    with pytest.raises(ProtocolViolation, match=match):
        acc.handle_append_request(AppendRequest(1, begin, end, 0, data))


def test_complete_append_requires_durable_write():
    acc, _ = new_acceptor()
    elect(acc, 1, [(1, START)], START)
    out = acc.handle_append_request(AppendRequest(1, START, START + 1, 0, b"a"))
    with pytest.raises(ProtocolViolation, match="not durable"):
        acc.complete_append(out)


def test_complete_append_after_a_term_change_is_a_violation():
    acc, storage = new_acceptor()
    elect(acc, 1, [(1, START)], START)
    out = acc.handle_append_request(AppendRequest(1, START, START + 1, 0, b"a"))
    storage.write(out)
    acc.handle_vote_request(VoteRequest(2))
    with pytest.raises(ProtocolViolation, match="one at a time"):
        acc.complete_append(out)


# -- commit_lsn ----------------------------------------------------------


def test_commit_lsn_is_monotonic_and_capped_by_wal():
    acc, storage = new_acceptor()
    elect(acc, 1, [(1, START)], START)
    append(acc, storage, 1, b"abcdef")
    assert acc.update_commit_lsn(START + 4) == START + 4
    assert acc.update_commit_lsn(START + 2) == START + 4
    assert acc.update_commit_lsn(START + 100) == START + 6


def test_commit_from_a_peer_needs_the_same_last_log_term():
    acc, storage = new_acceptor()
    elect(acc, 1, [(1, START)], START)
    append(acc, storage, 1, b"abcdef")
    assert acc.update_commit_lsn(START + 4, peer_last_log_term=2) == START
    assert acc.update_commit_lsn(START + 4, peer_last_log_term=1) == START + 4


def test_commit_reaching_term_start_is_persisted_at_once():
    acc, storage = new_acceptor()
    elect(acc, 1, [(1, START)], START)
    append(acc, storage, 1, b"abcd", commit=START + 2)
    elect(acc, 2, [(1, START), (2, START + 4)], START + 4)
    append(acc, storage, 2, b"ef", commit=START + 3)
    assert storage.durable_state().commit_lsn == START + 2  # lazily persisted
    append(acc, storage, 2, b"", commit=START + 5)  # crosses term 2's start
    assert storage.durable_state().commit_lsn == START + 5
    append(acc, storage, 2, b"", commit=START + 6)
    assert storage.durable_state().commit_lsn == START + 5
    acc.checkpoint()
    assert (storage.durable_state().commit_lsn, storage.durable_state().flush_lsn) == (START + 6, START + 6)


def test_restart_keeps_term_history_and_refuses_old_terms():
    acc, storage = new_acceptor()
    elect(acc, 3, [(3, START)], START)
    append(acc, storage, 3, b"abc", commit=START + 3)
    acc = restart(storage)
    assert acc.last_log_term() == 3 and acc.flush_lsn() == START + 3
    assert append(acc, storage, 3, b"d").flush_lsn == START + 4
    assert append(acc, storage, 2, b"e").term == 3


def test_dispatch():
    acc, _ = new_acceptor()
    assert isinstance(acc.handle(VoteRequest(1)), VoteResponse)
    assert isinstance(acc.handle(ProposerElected(1, START, ((1, START),))), AppendResponse)
    assert isinstance(acc.handle(AppendRequest(1, START, START, 0)), WalWrite)
    with pytest.raises(TypeError):
        acc.handle("hello")  # type: ignore[arg-type]
