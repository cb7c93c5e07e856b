"""TermHistory operations and the divergence point of two histories (Neon RFC 013)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neonctl.engine.safekeeper.term_history import (
    CommonPoint,
    ProtocolViolation,
    TermHistory,
    TermSwitch,
    find_highest_common_point,
)
from neonctl.errors import Conflict


def test_history_is_a_validated_sequence():
    h = TermHistory([(1, 10), (3, 10), (4, 25)])
    assert len(h) == 3
    assert h[0] == TermSwitch(1, 10)
    assert h[1:] == TermHistory([(3, 10), (4, 25)])
    assert h == [(1, 10), (3, 10), (4, 25)]
    assert list(h) == h.to_list()
    assert "term 4 at 0/19" in repr(h)


@pytest.mark.parametrize(
    "switches",
    [[(2, 10), (2, 20)], [(3, 10), (2, 20)], [(1, 20), (2, 10)], [(1, -1)]],
)
def test_history_must_ascend(switches):
    with pytest.raises(ProtocolViolation) as e:
        TermHistory(switches)
    assert isinstance(e.value, Conflict)


def test_last_term_up_to_and_term_at():
    h = TermHistory([(1, 10), (2, 20), (5, 30)])
    assert h.last_term == 5
    assert TermHistory().last_term == 0
    assert h.up_to(29) == [(1, 10), (2, 20)]
    assert h.up_to(30) == h  # a term starting exactly at the end still counts
    assert h.up_to(9) == []
    assert h.term_at(9) is None
    assert h.term_at(10) == 1
    assert h.term_at(29) == 2
    assert h.term_at(10**9) == 5
    assert h.start_of(2) == 20
    assert h.start_of(3) is None
    assert h.extended(7, 40) == [(1, 10), (2, 20), (5, 30), (7, 40)]


def test_rfc013_divergence_point():
    # RFC 013: A holds 1.1 1.2 1.3 1.4 from term 1; P3 in term 3 has history
    # 1@1, 2@2, 3@4. A's tail 1.2..1.4 was never committed and must go: the
    # common point is the end of term 1 in P3's history.
    a = [(1, 1)]
    p3 = [(1, 1), (2, 2), (3, 4)]
    assert find_highest_common_point(p3, a, their_flush_lsn=5) == CommonPoint(1, 2)


def test_common_point_cases():
    prop = [(1, 0), (2, 100), (4, 300)]
    # identical prefix, acceptor behind: keep all it has
    assert find_highest_common_point(prop, [(1, 0), (2, 100)], 250) == (2, 250)
    # acceptor has more of term 2 than the proposer's history: cut at term 4's start
    assert find_highest_common_point(prop, [(1, 0), (2, 100)], 350) == (2, 300)
    # acceptor wrote in term 3, which the proposer's history skips
    assert find_highest_common_point(prop, [(1, 0), (2, 100), (3, 200)], 260) == (2, 200)
    # already in the proposer's term (reconnect): everything it has is good
    assert find_highest_common_point(prop, prop, 420) == (4, 420)
    # no term in common
    assert find_highest_common_point(prop, [(3, 0)], 50) is None
    assert find_highest_common_point(prop, [], 0) is None
    # acceptor with a later term the proposer lacks after the common one
    assert find_highest_common_point([(1, 0), (5, 80)], [(1, 0), (3, 60)], 90) == (1, 60)


def test_bounded_proposer_history_is_symmetric():
    mine, theirs = [(1, 0), (2, 100)], [(1, 0), (2, 100)]
    assert find_highest_common_point(mine, theirs, 150, my_flush_lsn=120) == (2, 120)
    assert find_highest_common_point(theirs, mine, 120, my_flush_lsn=150) == (2, 120)


def test_same_term_with_different_starts_is_refused():
    with pytest.raises(ProtocolViolation, match="term 2 starts at"):
        find_highest_common_point([(1, 0), (2, 100)], [(1, 0), (2, 90)], 200)


def test_history_beyond_flush_is_refused():
    with pytest.raises(ProtocolViolation, match="above its flush LSN"):
        find_highest_common_point([(1, 0), (2, 100)], [(1, 0), (2, 100)], 50)
    with pytest.raises(ProtocolViolation, match="above its flush LSN"):
        find_highest_common_point([(1, 0), (2, 100)], [(1, 0)], 50, my_flush_lsn=50)


# -- property: the divergence point computed from histories equals the real one --
#
# Logs are built the way the protocol builds them: a new term takes a prefix of
# an existing log and appends its own bytes. Each byte is stamped with the term
# that wrote it, so two logs hold the same WAL exactly where their stamps agree.


@st.composite
def log_family(draw):
    logs: list[tuple[list[int], TermHistory]] = [([], TermHistory())]
    for term in range(1, draw(st.integers(2, 8)) + 1):
        parent, history = logs[draw(st.integers(0, len(logs) - 1))]
        cut = draw(st.integers(0, len(parent)))
        grow = draw(st.integers(0, 6))
        logs.append((parent[:cut] + [term] * grow, history.up_to(cut).extended(term, cut)))
    return logs[1:]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@settings(max_examples=200, deadline=None)
@given(log_family(), st.data())
def test_common_point_matches_stamped_wal(logs, data):
    wal_a, hist_a = logs[data.draw(st.integers(0, len(logs) - 1))]
    wal_b, hist_b = logs[data.draw(st.integers(0, len(logs) - 1))]
    point = find_highest_common_point(hist_a, hist_b, len(wal_b), my_flush_lsn=len(wal_a))
    if hist_a[0].term != hist_b[0].term:
        assert point is None
    else:
        assert point is not None
        assert point.lsn == _common_prefix(wal_a, wal_b)
        swapped = find_highest_common_point(hist_b, hist_a, len(wal_a), my_flush_lsn=len(wal_b))
        assert swapped == point
