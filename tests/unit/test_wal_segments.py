"""SegmentedWal: WAL in segment files, shared by a writing and reading threads."""

from __future__ import annotations

import threading

from neonctl.engine.wal.segments import SegmentedWal

SEG = 1 << 16  # small segments: many files, many descriptor evictions


def _pattern(segno: int) -> bytes:
    return bytes([segno % 251]) * SEG


def test_round_trip_zeros_and_truncate(tmp_path):
    wal = SegmentedWal(tmp_path / "wal", SEG)
    wal.write(SEG - 10, b"x" * 20)  # across a segment boundary
    assert wal.read(SEG - 10, 20) == b"x" * 20
    assert wal.read(5 * SEG, 8) == bytes(8)  # a missing segment reads as zeros
    assert wal.segments() == [0, 1]
    wal.truncate(SEG + 5)
    assert wal.read(SEG - 10, 20) == b"x" * 15 + bytes(5)
    wal.write(3 * SEG, b"y")
    wal.truncate(2 * SEG)
    assert wal.segments() == [0, 1]  # segment 3 is gone; 2 never existed
    wal.close()


def test_readers_never_see_another_segment_while_a_writer_evicts_descriptors(tmp_path):
    """12 segments, 8 descriptors kept: a reader racing the writer's evictions must read its own file."""
    wal = SegmentedWal(tmp_path / "wal", SEG)
    for segno in range(12):
        wal.write(segno * SEG, _pattern(segno))
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer():
        i = 0
        try:
            while not stop.is_set():
                segno = i % 12
                wal.write(segno * SEG + 100, _pattern(segno)[:512])  # rewrites the same bytes
                i += 7
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for round_ in range(300):
            segno = (round_ * 5) % 12
            assert wal.read(segno * SEG, SEG) == _pattern(segno), f"segment {segno} read wrong bytes"
            buf = bytearray(SEG)
            wal.read_into(segno * SEG, memoryview(buf))
            assert buf == _pattern(segno)
    finally:
        stop.set()
        t.join()
    assert not errors
    wal.close()
