"""The safekeeper's lazy control-file writer against a timeline deleted under it (its directory renamed away
while the write runs on a thread): the deleted timeline is skipped, a live one's failure still surfaces."""

from __future__ import annotations

import asyncio

import pytest

from neonctl.engine.safekeeper.control_file import TimelineState
from neonctl.engine.safekeeper.service import Safekeeper
from neonctl.engine.safekeeper.timeline import SkTimeline

TID = "0" * 31 + "7"


def _safekeeper(tmp_path) -> tuple[Safekeeper, SkTimeline]:
    sk = Safekeeper(1, tmp_path / "sk1", "127.0.0.1:0", None, {})
    state = TimelineState(timeline_id=TID, system_id=7, pg_version=18, timeline_start_lsn=1 << 24,
                          flush_lsn=1 << 24, commit_lsn=1 << 24)
    tl = SkTimeline.create(tmp_path / "sk1" / "timelines" / TID, state)
    sk.timelines[TID] = tl
    return sk, tl


def _rename_during_write(sk: Safekeeper, tl: SkTimeline, unregister: bool) -> None:
    write = tl.write

    def racing(snapshot):
        if unregister:
            sk.timelines.pop(TID)  # what delete_timeline does before its rename
        tl.dir.rename(tl.dir.with_name("deleted-" + TID))
        write(snapshot)

    tl.write = racing


async def _one_pass(sk: Safekeeper) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(sk.persist_loop(stop))
    await asyncio.sleep(1.3)  # the loop writes after its first 1 s sleep
    stop.set()
    await asyncio.wait_for(task, 3)


def test_a_timeline_deleted_under_the_write_is_skipped(tmp_path):
    sk, tl = _safekeeper(tmp_path)
    _rename_during_write(sk, tl, unregister=True)
    asyncio.run(_one_pass(sk))  # no exception: the loop went on
    assert TID not in sk.timelines


def test_a_live_timeline_whose_directory_vanished_still_fails(tmp_path):
    sk, tl = _safekeeper(tmp_path)
    _rename_during_write(sk, tl, unregister=False)
    with pytest.raises(FileNotFoundError):
        asyncio.run(_one_pass(sk))
