"""A lone safekeeper's repair at the pageserver's WAL end, on disk only (no daemon): shape, loss, validation."""

from __future__ import annotations

import pytest

from neonctl.engine.safekeeper.control_file import TimelineState, load
from neonctl.engine.safekeeper.pageserver_repair import PageserverPoint, loss, rebuild
from neonctl.engine.safekeeper.term_history import TermSwitch
from neonctl.engine.safekeeper.timeline import BrokenTimeline
from neonctl.errors import Conflict, InvalidInput

TID = "ab" * 16
START, POINT, FLUSHED = 0x1500000, 0x1600000, 0x1600400


def broken(tmp_path, readable: bool = True) -> BrokenTimeline:
    d = tmp_path / TID
    (d / "wal").mkdir(parents=True, exist_ok=True)
    (d / "wal" / "000000010000000000000001").write_bytes(b"\xab" * 4096)  # the damaged WAL
    state = TimelineState(timeline_id=TID, system_id=7, pg_version=17, term=5,
                          term_history=[TermSwitch(2, START), TermSwitch(4, POINT - 100), TermSwitch(5, POINT + 8)],
                          timeline_start_lsn=START, flush_lsn=FLUSHED, commit_lsn=FLUSHED,
                          remote_consistent_lsn=POINT + 8) if readable else None
    return BrokenTimeline(d, TID, "WAL is damaged", state)


def test_rebuild_keeps_the_term_and_the_history_up_to_the_point(tmp_path):
    tl, report = rebuild(broken(tmp_path), PageserverPoint(POINT, 7, 17))
    assert (tl.flush_lsn, tl.commit_lsn, tl.timeline_start_lsn, tl.wal_start_lsn) == (POINT,) * 4
    assert tl.term == 5 and tl.compute is None
    assert [tuple(e) for e in tl.term_history()] == [(2, START), (4, POINT - 100)]
    assert tl.last_log_term == 4 and not tl.in_term  # the next election is term 6
    assert not list((tmp_path / TID / "wal").iterdir())  # the damaged WAL is gone, nothing copied back
    on_disk = load(tmp_path / TID / "safekeeper.control")
    assert (on_disk.term, on_disk.flush_lsn, on_disk.remote_consistent_lsn) == (5, POINT, POINT)
    assert report == {"source": "pageserver", "recovered_to": "0/1600000", "lost_from": "0/1600000",
                      "lost_to": "0/1600400", "lost_bytes": 0x400, "summary": report["summary"]}
    assert "from 0/1600000 to 0/1600400 (1024 bytes) existed only on this safekeeper and is lost" in report["summary"]
    tl.close()


def test_loss_is_none_when_the_pageserver_has_everything_and_unknown_without_a_control_file(tmp_path):
    b = broken(tmp_path)
    nothing = loss(b, FLUSHED)
    assert (nothing["lost_from"], nothing["lost_to"], nothing["lost_bytes"]) == (None, None, 0)
    assert "nothing is lost" in nothing["summary"]
    tl, report = rebuild(broken(tmp_path / "x", readable=False), PageserverPoint(POINT, 7, 17))
    assert (report["lost_from"], report["lost_to"], report["lost_bytes"]) == ("0/1600000", None, None)
    assert "is unknown" in report["summary"]
    assert tl.term == 0 and not tl.term_history() and tl.system_id == 7 and tl.pg_version == 17
    tl.close()


def test_rebuild_refuses_a_pageserver_copy_that_does_not_fit(tmp_path):
    with pytest.raises(Conflict, match="system"):
        rebuild(broken(tmp_path), PageserverPoint(POINT, 8, 17))
    with pytest.raises(Conflict, match="before the timeline's start"):
        rebuild(broken(tmp_path), PageserverPoint(START - 8, 7, 17))
    assert list((tmp_path / TID / "wal").iterdir())  # refused before anything was removed


@pytest.mark.parametrize("obj", [
    None, [], {"last_record_lsn": 1, "system_id": 2}, {"last_record_lsn": True, "system_id": 2, "pg_version": 17},
    {"last_record_lsn": -1, "system_id": 2, "pg_version": 17},
    {"last_record_lsn": "1", "system_id": 2, "pg_version": 17},
    {"last_record_lsn": 1, "system_id": 2, "pg_version": 17, "path": "/tmp"},
    {"last_record_lsn": 1, "system_id": 2, "pg_version": 17, "wal_seg_size": 3},
])
def test_the_request_values_are_validated(obj):
    with pytest.raises(InvalidInput):
        PageserverPoint.from_json(obj)
    assert PageserverPoint.from_json({"last_record_lsn": 1, "system_id": 2, "pg_version": 17}) == \
        PageserverPoint(1, 2, 17)
