"""The pool of stopped compute directories: slots newest first, bounded in count and bytes, records."""

from __future__ import annotations

import time

from neonctl.engine.compute import dir_pool


def _pgdata(tmp_path, name: str, nbytes: int):
    d = tmp_path / "computes" / name / "pgdata"
    d.mkdir(parents=True)
    (d / "base").write_bytes(b"x" * nbytes)
    return d


def test_newest_first_and_bounded_in_count(tmp_path):
    root = tmp_path / "pool"
    for i in range(3):
        dir_pool.keep(root, _pgdata(tmp_path, f"c{i}", 1000), {"timeline_id": f"t{i}"}, size=2, max_bytes=1 << 20)
        time.sleep(0.002)
    slots = dir_pool.slots(root)
    assert [dir_pool.read_record(s)["timeline_id"] for s in slots] == ["t2", "t1"]  # t0 evicted
    assert all(dir_pool.read_record(s)["bytes"] == 1000 for s in slots)
    assert dir_pool.usage(root) == {"directories": 2, "bytes": 2000}
    assert not list(root.glob(".evicted-*"))


def test_bounded_in_bytes(tmp_path):
    root = tmp_path / "pool"
    dir_pool.keep(root, _pgdata(tmp_path, "a", 600), {"timeline_id": "a"}, size=5, max_bytes=1000)
    dir_pool.keep(root, _pgdata(tmp_path, "b", 600), {"timeline_id": "b"}, size=5, max_bytes=1000)
    assert [dir_pool.read_record(s)["timeline_id"] for s in dir_pool.slots(root)] == ["b"]
    # a directory larger than the bound alone, or a pool of size 0, keeps nothing (and evicts nothing)
    big = _pgdata(tmp_path, "big", 2000)
    assert dir_pool.keep(root, big, {"timeline_id": "big"}, size=5, max_bytes=1000) is None and big.exists()
    assert dir_pool.keep(root, _pgdata(tmp_path, "z", 10), {"timeline_id": "z"}, size=0, max_bytes=1000) is None
    assert [dir_pool.read_record(s)["timeline_id"] for s in dir_pool.slots(root)] == ["b"]


def test_a_slot_without_record_is_evicted_first_and_forgetting(tmp_path):
    root = tmp_path / "pool"
    for name in ("a", "b"):
        dir_pool.keep(root, _pgdata(tmp_path, name, 10), {"timeline_id": name}, size=3, max_bytes=1 << 20)
        time.sleep(0.002)
    assert dir_pool.forget_timeline(root, "b") == 1  # its history was cut back: never a known state again
    assert dir_pool.slots(root)[-1].name == next(s for s in dir_pool.slots(root) if not dir_pool.read_record(s)).name
    dir_pool.keep(root, _pgdata(tmp_path, "c", 10), {"timeline_id": "c"}, size=2, max_bytes=1 << 20)
    assert sorted(dir_pool.read_record(s)["timeline_id"] for s in dir_pool.slots(root)) == ["a", "c"]
    dir_pool.forget_all(root)
    assert all(dir_pool.read_record(s) is None for s in dir_pool.slots(root))
