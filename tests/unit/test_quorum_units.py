"""The safekeeper's timeline storage, peer recovery rules and the pageserver's safekeeper choice, without daemons."""

from __future__ import annotations

import pytest

from neonctl.engine.pageserver.timeline.walreceiver import (
    LAGGING_WAL_TIMEOUT,
    MAX_LSN_WAL_LAG,
    choose,
    pick_safekeeper,
)
from neonctl.engine.safekeeper.acceptor import ProposerElected, VoteRequest
from neonctl.engine.safekeeper.control_file import TimelineState, load
from neonctl.engine.safekeeper.peer_recovery import best_donor, join_term
from neonctl.engine.safekeeper.term_history import ProtocolViolation
from neonctl.engine.safekeeper.timeline import (
    CONTROL_FILE,
    BrokenTimeline,
    SkTimeline,
    open_timeline,
)

SEG = 16 << 20
TLI = "ab" * 16


def new_timeline(tmp_path) -> SkTimeline:
    st = TimelineState(timeline_id=TLI, system_id=7, pg_version=18, timeline_start_lsn=SEG, flush_lsn=SEG,
                       commit_lsn=SEG)
    return SkTimeline.create(tmp_path / TLI, st)


def write(tl: SkTimeline, data: bytes) -> None:
    tl.append(tl.write_lsn, data)
    tl.sync()
    tl.mark_synced(tl.write_lsn, tl.record_lsn)


def wal(WalWriter, n: int = 60):
    w = WalWriter(SEG)
    for i in range(n):
        w.append(21, 0, bytes([i % 251]) * 300)
    return w


def elected_timeline(tmp_path, WalWriter, n: int = 60):
    tl = new_timeline(tmp_path)
    assert tl.acceptor.handle_vote_request(VoteRequest(1)).vote_given
    tl.acceptor.handle_proposer_elected(ProposerElected(1, SEG, ((1, SEG),)))
    w = wal(WalWriter, n)
    write(tl, w.data())
    return tl, w


def test_flush_lsn_is_the_durable_end_of_the_last_complete_record(tmp_path, WalWriter):
    w = wal(WalWriter)
    tl = new_timeline(tmp_path)
    data = w.data()
    write(tl, data[:-100])  # the last record is cut short
    assert tl.synced_lsn == SEG + len(data) - 100 and tl.flush_lsn == w.ends[-2]
    tl.normalize()  # what a vote does first: the partial record goes
    assert tl.write_lsn == tl.synced_lsn == tl.flush_lsn == w.ends[-2]
    tl.persist()
    tl.close()
    again = open_timeline(tl.dir)
    assert isinstance(again, SkTimeline) and again.flush_lsn == w.ends[-2]


def test_damaged_wal_below_the_flush_point_is_refused(tmp_path, WalWriter):
    w = wal(WalWriter)
    tl = new_timeline(tmp_path)
    write(tl, w.data())
    tl.persist()
    tl.close()
    seg_file = next((tl.dir / "wal").iterdir())
    with open(seg_file, "r+b") as f:
        f.seek(w.lsns[25] - SEG + 30)
        f.write(b"\xab" * 64)
    broken = open_timeline(tl.dir)
    assert isinstance(broken, BrokenTimeline)
    assert "WAL is damaged at" in broken.corrupt and broken.state.term == 0


def test_a_torn_tail_above_the_flush_hint_is_just_cut(tmp_path, WalWriter):
    w = wal(WalWriter)
    data = w.data()
    tl = new_timeline(tmp_path)
    write(tl, data[: w.ends[40] - SEG])
    tl.persist()  # the control file says: flushed to the end of record 40
    write(tl, data[w.ends[40] - SEG:])
    tl.close()
    seg_file = next((tl.dir / "wal").iterdir())
    with open(seg_file, "r+b") as f:  # a crash tore record 50
        f.seek(w.lsns[50] - SEG + 30)
        f.write(bytes(64))
    again = open_timeline(tl.dir)
    assert isinstance(again, SkTimeline) and again.flush_lsn == w.ends[49]


def test_corrupt_control_file_is_refused(tmp_path):
    tl = new_timeline(tmp_path)
    tl.close()
    path = tl.dir / CONTROL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(data)
    broken = open_timeline(tl.dir)
    assert isinstance(broken, BrokenTimeline) and "checksum" in broken.corrupt and broken.state is None


def test_a_vote_is_durable_and_a_divergent_tail_is_cut_at_the_common_point(tmp_path, WalWriter):
    tl, w = elected_timeline(tmp_path, WalWriter)
    assert tl.flush_lsn == w.ends[-1] and tl.last_log_term == 1
    resp = tl.acceptor.handle_vote_request(VoteRequest(3))
    assert resp.vote_given and resp.flush_lsn == w.ends[-1]
    assert load(tl.dir / CONTROL_FILE).term == 3  # on disk before the answer
    # term 3 was elected elsewhere from a log that stopped at record 20 of term 1
    start = join_term(tl, 3, [[1, SEG], [3, w.ends[20]]])
    assert start == tl.flush_lsn == tl.write_lsn == w.ends[20]
    assert tl.wal.read(w.ends[20], 512) == bytes(512), "the divergent tail is zeroed, not just forgotten"
    tl.close()
    again = open_timeline(tl.dir)
    assert isinstance(again, SkTimeline)
    assert again.flush_lsn == w.ends[20] and again.term == 3 and again.last_log_term == 3
    assert [tuple(e) for e in again.term_history()] == [(1, SEG), (3, w.ends[20])]


def test_committed_wal_is_never_truncated(tmp_path, WalWriter):
    tl, w = elected_timeline(tmp_path, WalWriter)
    tl.update_commit(w.ends[30])
    with pytest.raises(ProtocolViolation, match="committed"):
        join_term(tl, 2, [[1, SEG], [2, w.ends[20]]])
    assert tl.flush_lsn == w.ends[-1] and tl.term == 1


def info(term, llt, flush, history, **kw):
    return {"term": term, "last_log_term": llt, "flush_lsn": flush, "term_history": history,
            "address": kw.pop("address", "a"), **kw}


def test_best_donor(tmp_path, WalWriter):
    tl, w = elected_timeline(tmp_path, WalWriter)
    h1 = [[1, SEG]]
    assert best_donor(tl, {}) is None
    assert best_donor(tl, {"2": info(1, 1, tl.flush_lsn, h1)}) is None  # not ahead
    ahead = info(1, 1, tl.flush_lsn + 100, h1, address="b")
    assert best_donor(tl, {"2": ahead, "3": info(1, 1, tl.flush_lsn, h1)}) is ahead
    newer = info(2, 2, w.ends[10], [[1, SEG], [2, w.ends[10]]], address="c")
    assert best_donor(tl, {"2": ahead, "3": newer}) is newer  # a newer term wins even with less WAL
    voted_only = info(4, 1, tl.flush_lsn + 999, h1)  # voted for term 4, not joined it: no donor yet
    assert best_donor(tl, {"2": voted_only}) is None
    assert best_donor(tl, {"2": info(1, 1, tl.flush_lsn + 100, h1, corrupt="bad")}) is None


def sk(addr, commit, published_at, flush=None, **kw):
    return {"address": addr, "commit_lsn": commit, "flush_lsn": flush or commit, "published_at": published_at, **kw}


def test_pageserver_picks_highest_commit_and_sticks_until_lag_or_silence():
    now = 1000.0
    view = {"1": sk("a", 100, now), "2": sk("b", 200, now), "3": sk("c", 150, now, corrupt="x")}
    assert pick_safekeeper(view, ["a", "b", "c"], now) == ["b", "a", "c"]  # the damaged one only as fallback
    assert choose(None, view, [], {}, now)[0] == "b"
    assert choose("a", view, [], {}, now)[0] == "a", "a small lag is no reason to switch"
    view["2"] = sk("b", 100 + MAX_LSN_WAL_LAG, now)
    assert choose("a", view, [], {}, now)[0] == "b", "switch when lagging by max_lsn_wal_lag"
    view = {"1": sk("a", 100, now - LAGGING_WAL_TIMEOUT - 1), "2": sk("b", 100, now)}
    assert choose("a", view, [], {}, now)[0] == "b", "switch when the current one went silent"
    view = {"1": sk("a", 100, now - 60), "2": sk("b", 100, now - 60)}
    assert choose("a", view, [], {}, now)[0] == "a", "the broker is down: keep the current one"
    view = {"1": sk("a", 100, now), "2": sk("b", 120, now)}
    assert choose("a", view, [], {}, now, stalled_at=110)[0] == "b", "stalled below another's commit"
    assert choose("a", view, [], {}, now, stalled_at=120)[0] == "a"


def test_trimming_removes_whole_segments_below_the_horizon(tmp_path, WalWriter):
    seg = 1 << 20
    st = TimelineState(timeline_id=TLI, system_id=7, pg_version=18, timeline_start_lsn=seg, flush_lsn=seg,
                       commit_lsn=seg, wal_seg_size=seg)
    tl = SkTimeline.create(tmp_path / TLI, st)
    w = WalWriter(seg, seg_size=seg)
    while w.pos < 4 * seg + 1000:
        w.append(21, 0, b"x" * 2000)
    write(tl, w.data())
    assert len(tl.wal.segments()) == 4
    assert tl.remove_segments_below(3 * seg + 10) == 2  # segments 1 and 2 end at or below it
    assert tl.wal_start_lsn == 3 * seg and len(tl.wal.segments()) == 2
    with pytest.raises(Exception, match="not on this safekeeper"):
        tl.read(2 * seg, 100)
    tl.persist()
    tl.close()
    again = open_timeline(tl.dir)
    assert isinstance(again, SkTimeline) and again.wal_start_lsn == 3 * seg and again.flush_lsn == w.ends[-1]
