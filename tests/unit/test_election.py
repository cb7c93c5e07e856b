"""Proposer elections, commit rule, and a randomized safety simulation of the whole protocol."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from neonctl.engine.safekeeper.acceptor import (
    Acceptor,
    AppendRequest,
    AppendResponse,
    ProposerElected,
    VoteRequest,
    VoteResponse,
    WalWrite,
)
from neonctl.engine.safekeeper.control_file import TimelineState, decode, encode
from neonctl.engine.safekeeper.proposer import (
    Election,
    ElectionResult,
    commit_lsn,
    quorum,
)
from neonctl.engine.safekeeper.term_history import (
    CommonPoint,
    ProtocolViolation,
    TermHistory,
)
from neonctl.errors import Conflict

START = 0x100
N = 3
TLI = "cd" * 16


def vote(term, flush, history, commit=START, given=True, start=START) -> VoteResponse:
    return VoteResponse(term, given, flush, commit, tuple(history), start)


# -- quorum and commit rule ----------------------------------------------


@pytest.mark.parametrize("n,q", [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (7, 4)])
def test_quorum(n, q):
    assert quorum(n) == q


def test_commit_lsn_is_highest_lsn_on_a_quorum():
    assert commit_lsn([10, 30, 20], 3) == 20
    assert commit_lsn([30, 20], 3) == 20
    assert commit_lsn([30], 3) == 0
    assert commit_lsn([5, 9, 7, 1, 3], 5) == 5
    assert commit_lsn([], 1) == 0
    with pytest.raises(ValueError):
        commit_lsn([1, 2, 3, 4], 3)


def test_commit_lsn_ignores_flushes_below_term_start():
    # Like Raft: WAL of earlier terms is not committed by counting replicas.
    assert commit_lsn([10, 20, 30], 3, term_start_lsn=25) == 0
    assert commit_lsn([10, 25, 30], 3, term_start_lsn=25) == 25


# -- deciding an election --------------------------------------------------


def test_fresh_timeline():
    e = Election(1, 3)
    e.add_vote(0, vote(1, START, []))
    assert not e.is_won()
    with pytest.raises(Conflict, match="1 of 2 votes"):
        e.result()
    e.add_vote(2, vote(1, START, []))
    r = e.result()
    assert (r.term, r.donor, r.start_lsn, r.term_history) == (1, 0, START, TermHistory([(1, START)]))
    assert {sk: (p.start_streaming_at, p.needs_recovery) for sk, p in r.per_acceptor_plan.items()} == {
        0: (START, False),
        2: (START, False),
    }
    assert r.proposer_elected(2) == ProposerElected(1, START, ((1, START),))


def test_donor_is_highest_last_log_term_then_flush():
    e = Election(5, 3)
    e.add_vote(0, vote(5, 0x500, [(1, START)]))  # long log of an old term
    e.add_vote(1, vote(5, 0x300, [(1, START), (2, 0x200)]))
    e.add_vote(2, vote(5, 0x280, [(1, START), (2, 0x200)]))
    r = e.result()
    assert r.donor == 1 and r.start_lsn == 0x300
    assert r.term_history == [(1, START), (2, 0x200), (5, 0x300)]
    a = r.per_acceptor_plan[0]
    assert a.common_point == CommonPoint(1, 0x200)
    assert (a.start_streaming_at, a.fetch_from, a.fetch_to, a.needs_recovery) == (0x200, 0x200, 0x300, True)
    assert (r.per_acceptor_plan[2].fetch_from, r.per_acceptor_plan[2].fetch_to) == (0x280, 0x300)
    assert not r.per_acceptor_plan[1].needs_recovery


def test_rfc013_scenario():
    # Five safekeepers, records one byte each, n.m = term n at LSN m.
    # C and D hold 1.1 2.2 2.3, E holds 1.1: P3 is elected by C, D, E.
    e = Election(3, 5)
    e.add_vote(2, vote(3, 4, [(1, 1), (2, 2)], commit=2, start=1))
    e.add_vote(3, vote(3, 4, [(1, 1), (2, 2)], commit=2, start=1))
    e.add_vote(4, vote(3, 2, [(1, 1)], commit=2, start=1))
    r = e.result()
    assert r.donor == 2 and r.term_history == [(1, 1), (2, 2), (3, 4)]
    # A comes back with 1.1 1.2 1.3 1.4: its tail after 1.1 is cut, then 2.2 2.3 arrive.
    e.add_vote(0, vote(3, 5, [(1, 1)], commit=2, start=1))
    plan = r.per_acceptor_plan[0]
    assert (plan.start_streaming_at, plan.fetch_from, plan.fetch_to) == (2, 2, 4)


def test_history_is_cut_at_donor_flush():
    e = Election(4, 1)
    e.add_vote(7, vote(4, 0x150, [(1, START), (2, 0x150)]))
    assert e.result().term_history == [(1, START), (2, 0x150), (4, 0x150)]


def test_higher_term_refusal_supersedes():
    e = Election(2, 3)
    e.add_vote(0, vote(2, START, []))
    e.add_vote(1, vote(2, START, []))
    e.add_vote(2, vote(9, START, [], given=False))
    assert e.superseded_by == 9 and not e.is_won()
    with pytest.raises(Conflict, match="superseded by term 9"):
        e.result()


def test_same_term_refusal_is_not_a_vote_but_may_join_later():
    e = Election(2, 3)
    e.add_vote(0, vote(2, START, [], given=False))
    e.add_vote(1, vote(2, START, []))
    assert not e.is_won()
    e.add_vote(2, vote(2, START, []))
    r = e.result()
    assert set(r.per_acceptor_plan) == {0, 1, 2}
    e.add_vote(1, vote(2, START, [], given=False))  # reconnect after the vote: plan is refreshed
    assert e.result() is r and set(r.per_acceptor_plan) == {0, 1, 2}


def test_inconsistent_votes_are_violations():
    e = Election(3, 3)
    with pytest.raises(ProtocolViolation):
        e.add_vote(0, vote(4, START, []))  # vote_given for another term
    with pytest.raises(ProtocolViolation):
        e.add_vote(0, vote(2, START, [], given=False))  # refusal from a lower term
    e.add_vote(0, vote(3, 0x300, [(2, START)], commit=0x300))
    e.add_vote(1, vote(3, 0x250, [(2, START)], commit=0x240))
    assert e.result().start_lsn == 0x300
    e2 = Election(3, 3)
    e2.add_vote(0, vote(3, 0x200, [(2, START)]))
    e2.add_vote(1, vote(3, 0x400, [(1, START)], commit=0x300))  # committed WAL the donor lacks
    with pytest.raises(ProtocolViolation, match="below commit_lsn"):
        e2.result()


# -- competing elections -----------------------------------------------------


def fresh_acceptors(n: int = N) -> list[Acceptor]:
    accs = []
    for _ in range(n):
        st_ = TimelineState(
            timeline_id=TLI, system_id=1, pg_version=17, timeline_start_lsn=START, flush_lsn=START, commit_lsn=START
        )
        accs.append(Acceptor(st_, NullStorage()))
    return accs


class NullStorage:
    def persist(self, state):
        pass

    def truncate_wal(self, lsn):
        pass

    def flush_lsn(self):
        return START


@pytest.mark.parametrize("order", list(itertools.product([0, 1], repeat=N)))
def test_same_term_at_most_one_winner(order):
    accs = fresh_acceptors()
    elections = [Election(1, N), Election(1, N)]
    for sk, first in enumerate(order):
        for p in (first, 1 - first):
            elections[p].add_vote(sk, accs[sk].handle_vote_request(VoteRequest(1)))
    winners = [e.is_won() for e in elections]
    assert winners.count(True) == 1  # with N=3 one of the two always gets two first votes


@pytest.mark.parametrize("order", list(itertools.product([0, 1], repeat=N)))
def test_different_terms_lower_winner_is_fenced(order):
    accs = fresh_acceptors()
    low, high = Election(1, N), Election(2, N)
    for sk, first in enumerate(order):
        for e in (low, high) if first == 0 else (high, low):
            e.add_vote(sk, accs[sk].handle_vote_request(VoteRequest(e.term)))
    assert high.is_won()
    # The lower term may have collected a quorum first, but it cannot act on it:
    # every acceptor is now in term 2 and answers its messages with term 2.
    if low.is_won():
        r = low.result()
        for sk in r.per_acceptor_plan:
            assert accs[sk].handle_proposer_elected(r.proposer_elected(sk)).term == 2
    else:
        assert low.superseded_by == 2 or len(low.votes) < quorum(N)
    assert sum(acc.term == 2 for acc in accs) >= quorum(N)


# -- the simulation ------------------------------------------------------------
#
# Three acceptors with in-memory WAL and control files; proposers that pick
# terms from what a subset of acceptors told them (so terms collide) and run
# concurrently; partial recoveries; an acceptor cut off for a while; restarts
# between steps and power loss inside ProposerElected. Every WAL byte is
# the number of the term that generated it, so WAL content can be compared
# exactly. Checked after every step:
#   * all commits agree: each is a prefix of one committed log (a commit is a
#     prefix of a proposer's log flushed on a quorum of acceptors in its term);
#   * a proposer elected in term t holds all WAL committed in terms below t,
#     and never makes an acceptor truncate it. (A proposer whose votes went
#     stale may win after a higher term committed more; it is fenced off, and
#     may only cut extra copies of that newer WAL on acceptors outside the
#     quorum that committed it);
#   * each acceptor's WAL matches its term history, and is a prefix of the
#     log of the proposer whose history it adopted;
# and at the end a final election reaches all three acceptors and leaves them
# with identical WAL.


class SafetyViolation(AssertionError):
    pass


class PowerLoss(Exception):
    pass


class SimStorage:
    def __init__(self, cluster: Cluster, sk: int):
        self.cluster, self.sk = cluster, sk
        self.wal = bytearray()
        self.control = b""
        self.crash_at_persist = 0  # 1 = the next persist loses power, 2 = the one after

    def persist(self, state: TimelineState) -> None:
        if self.crash_at_persist:
            self.crash_at_persist -= 1
            if not self.crash_at_persist:
                raise PowerLoss()
        self.control = encode(state)

    def truncate_wal(self, lsn: int) -> None:
        assert START <= lsn <= self.flush_lsn()
        self.cluster.check_truncation(self.sk, lsn)
        del self.wal[lsn - START :]

    def flush_lsn(self) -> int:
        return START + len(self.wal)

    def write(self, w: WalWrite) -> None:
        assert w.begin_lsn == self.flush_lsn()
        self.wal += w.wal_data


@dataclass
class Proposer:
    term: int
    election: Election
    result: ElectionResult | None = None
    log: bytearray | None = None
    alive: bool = True
    connected: set[int] = field(default_factory=set)
    streaming: dict[int, int] = field(default_factory=dict)  # sk -> next LSN to send
    flushes: dict[int, int] = field(default_factory=dict)  # acked in our term
    commit: int = 0


class Cluster:
    MAX_LOG = 64

    def __init__(self, commit_guard: bool = True):
        self.commit_guard = commit_guard
        self.committed = bytearray()  # the longest commit so far
        self.commits: dict[int, bytes] = {}  # term -> longest commit made in it
        self.storages = [SimStorage(self, sk) for sk in range(N)]
        self.acceptors: list[Acceptor] = []
        for storage in self.storages:
            state = TimelineState(
                timeline_id=TLI, system_id=1, pg_version=17, timeline_start_lsn=START, flush_lsn=START, commit_lsn=START
            )
            storage.persist(state)
            self.acceptors.append(Acceptor(state, storage))
        self.proposers: list[Proposer] = []
        self.leaders: dict[int, Proposer] = {}
        self.stats: Counter[str] = Counter()

    # -- protocol steps --

    def new_proposer(self, greeted: list[int]) -> Proposer:
        term = max(self.acceptors[sk].term for sk in greeted) + 1
        if any(p.term == term for p in self.proposers):
            self.stats["same-term proposers"] += 1
        p = Proposer(term, Election(term, N))
        self.proposers.append(p)
        return p

    def vote(self, p: Proposer, sk: int) -> None:
        if not p.alive or sk in p.connected:
            return
        p.connected.add(sk)
        p.election.add_vote(sk, self.acceptors[sk].handle_vote_request(VoteRequest(p.term)))
        if p.election.superseded_by is not None:
            p.alive = False
            self.stats["superseded"] += 1
        elif p.election.is_won() and p.result is None:
            self.take_office(p)

    def take_office(self, p: Proposer) -> None:
        r = p.result = p.election.result()
        if p.term in self.leaders:
            raise SafetyViolation(f"two proposers elected in term {p.term}")
        self.leaders[p.term] = p
        self.stats["elected"] += 1
        if any(acc.term > p.term for acc in self.acceptors):
            self.stats["stale election won"] += 1
        donor = self.storages[r.donor]
        if self.acceptors[r.donor].term != p.term:  # donor moved on: we are superseded
            p.alive = False
            return
        assert donor.flush_lsn() == r.start_lsn, "donor's WAL changed after its vote"
        p.log = bytearray(donor.wal)
        if not p.log.startswith(self.committed_before(p.term)):
            raise SafetyViolation(f"term {p.term} elected without all WAL committed in earlier terms")
        check_stamps(p.log, r.term_history, f"term {p.term} proposer")

    def elected(self, p: Proposer, sk: int, crash_at_persist: int = 0) -> None:
        if not p.alive or p.result is None or sk not in p.connected or sk in p.streaming:
            return
        plan = p.result.per_acceptor_plan.get(sk)
        if plan is None:
            return
        self.storages[sk].crash_at_persist = crash_at_persist
        try:
            resp = self.acceptors[sk].handle_proposer_elected(p.result.proposer_elected(sk))
        except PowerLoss:
            self.stats["crash in ProposerElected"] += 1
            self.restart(sk)
            return
        finally:
            self.storages[sk].crash_at_persist = 0
        if resp.term > p.term:
            p.alive = False
            return
        assert resp.flush_lsn == plan.start_streaming_at
        p.streaming[sk] = plan.start_streaming_at
        self.note_flush(p, sk, resp.flush_lsn)

    def append(self, p: Proposer, sk: int, nbytes: int) -> None:
        if not p.alive or sk not in p.streaming:
            return
        assert p.log is not None
        begin = p.streaming[sk]
        data = bytes(p.log[begin - START : begin - START + nbytes])
        out = self.acceptors[sk].handle_append_request(AppendRequest(p.term, begin, begin + len(data), p.commit, data))
        if isinstance(out, AppendResponse):
            assert out.term > p.term
            p.alive = False
            self.stats["append refused"] += 1
            return
        self.storages[sk].write(out)
        resp = self.acceptors[sk].complete_append(out)
        p.streaming[sk] = resp.flush_lsn
        self.note_flush(p, sk, resp.flush_lsn)

    def note_flush(self, p: Proposer, sk: int, flush: int) -> None:
        assert p.result is not None and p.log is not None
        p.flushes[sk] = flush
        term_start = p.result.start_lsn if self.commit_guard else 0
        c = commit_lsn(p.flushes.values(), N, term_start_lsn=term_start)
        if c <= p.commit:
            return
        p.commit = c
        new = p.log[: c - START]
        common = min(len(new), len(self.committed))
        if new[:common] != self.committed[:common]:
            raise SafetyViolation(f"term {p.term} committed WAL that contradicts earlier commits")
        self.commits[p.term] = bytes(new)
        if len(new) > len(self.committed):
            self.committed[:] = new
            self.stats["commits"] += 1

    def generate(self, p: Proposer, nbytes: int) -> None:
        if p.alive and p.log is not None and len(p.log) < self.MAX_LOG:
            p.log += bytes([p.term]) * nbytes

    def restart(self, sk: int) -> None:
        self.acceptors[sk] = Acceptor(decode(self.storages[sk].control), self.storages[sk])
        for p in self.proposers:
            self.disconnect(p, sk)

    def disconnect(self, p: Proposer, sk: int) -> None:
        p.connected.discard(sk)
        p.streaming.pop(sk, None)

    # -- invariants --

    def check_truncation(self, sk: int, lsn: int) -> None:
        wal = self.storages[sk].wal
        term = self.acceptors[sk].term  # the acceptor has persisted the truncating term
        held = _common_prefix(wal, self.committed_before(term + 1))
        if lsn - START < held:
            raise SafetyViolation(
                f"safekeeper {sk} truncated committed WAL at {lsn:#x} (holds up to {START + held:#x})"
            )
        if lsn - START < len(wal):
            self.stats["divergent tail truncated"] += 1

    def committed_before(self, term: int) -> bytes:
        """The longest WAL committed in terms below ``term``."""
        return max((c for t, c in self.commits.items() if t < term), key=len, default=b"")

    def check(self) -> None:
        for sk, acc in enumerate(self.acceptors):
            wal = self.storages[sk].wal
            check_stamps(wal, acc.term_history(), f"safekeeper {sk}")
            c = acc.commit_lsn - START
            if not (c <= len(wal) and c <= len(self.committed) and wal[:c] == self.committed[:c]):
                raise SafetyViolation(f"safekeeper {sk} has commit_lsn {acc.commit_lsn:#x} over uncommitted WAL")
            adopted = acc.adopted_term_history()
            if adopted:
                leader = self.leaders[adopted[-1].term]
                assert leader.log is not None
                if leader.log[: len(wal)] != wal:
                    raise SafetyViolation(f"safekeeper {sk} WAL differs from term {leader.term}'s log")

    def settle(self) -> Proposer:
        """Restart everything, elect one more proposer on all acceptors and let it finish."""
        for sk in range(N):
            self.restart(sk)
        p = self.new_proposer(list(range(N)))
        for sk in range(N):
            self.vote(p, sk)
        assert p.alive and p.log is not None
        for sk in range(N):
            self.elected(p, sk)
            self.check()
            self.append(p, sk, len(p.log))
        self.generate(p, 1)
        for sk in range(N):
            self.append(p, sk, 1)
        self.check()
        assert p.commit == START + len(p.log)
        for storage in self.storages:
            assert storage.wal == p.log
        assert p.log.startswith(self.committed)
        return p


def check_stamps(wal: bytes | bytearray, history: TermHistory, who: str) -> None:
    for i, term in enumerate(wal):
        if history.term_at(START + i) != term:
            raise SafetyViolation(f"{who}: byte at {START + i:#x} is from term {term}, history says {history!r}")


def _common_prefix(a: bytes | bytearray, b: bytes | bytearray) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


KINDS = ("campaign", "campaign", "new", "sync", "sync", "sync", "sync", "sync", "sync", "sync", "sync", "generate",
         "generate", "generate", "generate", "crash", "crash_elected", "isolate", "disconnect")  # fmt: skip
MAX_PROPOSERS = 16
APPEND_MOD = 5


def run(cluster: Cluster, ops) -> None:
    """Interpret (kind, proposer, safekeeper set, amount) tuples.

    The safekeeper set is a bit mask minus one (0..6); ``pi`` picks mostly
    the newest proposer (0..4), sometimes the one before (5, 6) or the first (7).
    """
    isolated: int | None = None  # a safekeeper no proposer can reach for now
    for kind, pi, mask, k in ops:
        targets = [sk for sk in range(N) if (mask + 1) >> sk & 1 and sk != isolated]
        if kind == "isolate":
            isolated = mask % N if isolated is None else None
        elif kind == "crash":
            cluster.restart(mask % N)
        elif kind in ("new", "campaign"):
            if len(cluster.proposers) < MAX_PROPOSERS and targets:
                p = cluster.new_proposer(targets)
                if kind == "campaign":  # the greeted vote at once, some hear the result at once
                    for sk in targets:
                        cluster.vote(p, sk)
                    for sk in targets:
                        if (k + 1) >> sk & 1:
                            cluster.elected(p, sk)
        elif cluster.proposers:
            newest = len(cluster.proposers) - 1
            p = cluster.proposers[newest if pi < 5 else max(newest - 1, 0) if pi < 7 else 0]
            if kind == "generate":
                cluster.generate(p, 1 + k % 3)
            for sk in targets:
                if kind in ("sync", "crash_elected"):  # the next protocol step towards sk
                    if sk not in p.connected:
                        cluster.vote(p, sk)
                    elif sk not in p.streaming:
                        cluster.elected(p, sk, crash_at_persist=1 + k % 2 if kind == "crash_elected" else 0)
                    else:
                        cluster.append(p, sk, k % APPEND_MOD)
                elif kind == "disconnect":
                    cluster.disconnect(p, sk)
        cluster.check()


# Raft's figure 8 on safekeepers A=0, B=1, C=2, in the language of run().
FIGURE8 = [
    ("campaign", 0, 6, 6),  # term 1, elected by A B C, all hear
    ("generate", 0, 0, 0),
    ("sync", 0, 6, 1),  # record 1.1 committed everywhere
    ("campaign", 0, 2, 0),  # term 2 by A B, only A hears
    ("generate", 0, 0, 1),
    ("sync", 0, 0, 2),  # 2.2 2.3 on A only
    ("campaign", 0, 5, 3),  # term 3 by B C, only C hears
    ("generate", 0, 0, 0),
    ("sync", 0, 3, 1),  # 3.2 on C only
    ("campaign", 0, 2, 2),  # term 4 by A B: donor A, starts after 2.3
    ("sync", 0, 1, 1),  # B recovers 2.2 only, below term 4's start
    ("campaign", 0, 5, 1),  # term 5 by B C: donor C (last log term 3 > B's 2), B hears
]


OPENING = ("campaign", 0, 6, 6)  # term 1, elected by all three; later terms compete


def _decode_op(x: int) -> tuple[str, int, int, int]:
    # One integer per step is much cheaper for hypothesis to generate than a tuple.
    x, kind = divmod(x, len(KINDS))
    x, pi = divmod(x, 8)
    k, mask = divmod(x, 7)
    return KINDS[kind], pi, mask, k


ops_strategy = st.lists(st.integers(0, len(KINDS) * 8 * 7 * 8 - 1), min_size=30, max_size=100).map(
    lambda xs: [OPENING, *map(_decode_op, xs)]
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops_strategy)
@example(FIGURE8)
def test_simulation_is_safe(ops):
    cluster = Cluster()
    run(cluster, ops)
    cluster.settle()


def test_simulation_reaches_the_interesting_cases():
    """Seeded runs of the same simulation, checking that it exercises what it claims to."""
    rng = random.Random(20240613)
    seen: Counter[str] = Counter()
    for _ in range(150):
        cluster = Cluster()
        ops = [(rng.choice(KINDS), rng.randrange(8), rng.randrange(7), rng.randrange(8)) for _ in range(80)]
        run(cluster, [OPENING, *ops])
        cluster.settle()
        seen.update(cluster.stats)
    for what in ("same-term proposers", "superseded", "stale election won", "commits", "divergent tail truncated",
                 "crash in ProposerElected", "append refused"):  # fmt: skip
        assert seen[what] > 0, (what, seen)


def test_old_term_wal_is_not_committed_by_counting_replicas():
    cluster = Cluster()
    run(cluster, FIGURE8)
    assert [cluster.leaders[t].result.donor for t in (4, 5)] == [0, 2]
    assert cluster.committed == bytes([1])  # term 4 did not commit 2.2 with A and B
    cluster.settle()


def test_counting_old_term_replicas_would_lose_commits():
    with pytest.raises(SafetyViolation, match="elected without all WAL committed"):
        run(Cluster(commit_guard=False), FIGURE8)
