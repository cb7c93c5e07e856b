"""safekeeper.control: round trip, damage detection, atomic replacement."""

from __future__ import annotations

import os
import struct

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neonctl.engine.safekeeper import control_file
from neonctl.engine.safekeeper.control_file import (
    CONTROL_FILE_NAME,
    TimelineState,
    decode,
    encode,
    last_log_term,
    load,
    save,
)
from neonctl.engine.safekeeper.term_history import TermSwitch
from neonctl.errors import CorruptData, InvalidInput, NotFound

TLI = "0123456789abcdef0123456789abcdef"


def make_state(**kw) -> TimelineState:
    base = {
        "timeline_id": TLI,
        "system_id": 7301234567890123456,
        "pg_version": 17,
        "term": 5,
        "term_history": [TermSwitch(1, 0x1000000), TermSwitch(3, 0x1002000), TermSwitch(5, 0x1003000)],
        "timeline_start_lsn": 0x1000000,
        "flush_lsn": 0x1004000,
        "commit_lsn": 0x1003800,
        "backup_lsn": 0x1000000,
        "peer_horizon_lsn": 0x1000000,
        "remote_consistent_lsn": 0x1002000,
        "compute": {"host": "127.0.0.1", "port": 55432, "user": "cloud_admin", "app_name": "neonctl"},
    }
    base.update(kw)
    return TimelineState(**base)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / CONTROL_FILE_NAME
    state = make_state()
    save(path, state)
    return path, state


def test_round_trip(saved):
    path, state = saved
    assert load(path) == state
    assert load(path.parent) == state  # a timeline directory works too
    assert not path.with_name(CONTROL_FILE_NAME + ".partial").exists()


def test_defaults_and_minimal_state(tmp_path):
    s = TimelineState(timeline_id=TLI, system_id=1, pg_version=16, timeline_start_lsn=8, flush_lsn=8, commit_lsn=8)
    assert (s.wal_seg_size, s.term, s.term_history, s.compute) == (16 * 1024 * 1024, 0, [], None)
    save(tmp_path, s)
    assert load(tmp_path / CONTROL_FILE_NAME) == s


def test_history_entries_come_back_as_term_switches(saved):
    path, _ = saved
    loaded = load(path)
    assert all(isinstance(e, TermSwitch) for e in loaded.term_history)
    assert loaded.term_history[1].start_lsn == 0x1002000


def test_layout(saved):
    path, state = saved
    data = path.read_bytes()
    magic, version, reserved, body_len = struct.unpack_from("<4sHHI", data)
    assert (magic, version, reserved) == (b"NCSK", 1, 0)
    assert len(data) == 12 + body_len + 4
    assert struct.unpack_from("<I", data, len(data) - 4)[0] == crc32c.crc32c(data[:-4])
    assert encode(state) == data  # deterministic


@pytest.mark.parametrize("keep", [0, 3, 11, 12, 40, -5, -1])
def test_truncated_file_is_corrupt_and_named(saved, keep):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CorruptData, match="truncated") as e:
        load(path)
    assert str(path) in str(e.value)


def test_flipped_bit_is_detected(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[40] ^= 0x10
    path.write_bytes(data)
    with pytest.raises(CorruptData, match="checksum") as e:
        load(path)
    assert str(path) in str(e.value)


def test_every_flipped_bit_is_detected(saved):
    path, _ = saved
    data = path.read_bytes()
    for i in range(len(data)):
        for bit in (0, 5):
            damaged = bytearray(data)
            damaged[i] ^= 1 << bit
            with pytest.raises(CorruptData) as e:
                decode(bytes(damaged), path)
            assert str(path) in str(e.value), (i, bit)


def test_wrong_magic(saved):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(b"PGCF" + data[4:])
    with pytest.raises(CorruptData, match="bad magic") as e:
        load(path)
    assert str(path) in str(e.value)


def _reseal(data: bytes) -> bytes:
    return data[:-4] + struct.pack("<I", crc32c.crc32c(data[:-4]))


def test_unknown_format_version(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 4, 2)
    path.write_bytes(_reseal(bytes(data)))
    with pytest.raises(CorruptData, match="format version 2"):
        load(path)


def test_trailing_bytes(saved):
    path, _ = saved
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(CorruptData, match="trailing"):
        load(path)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"timeline_id": "' + TLI.encode() + b'"}',  # missing fields
        b'{"bogus": 1}',
    ],
)
def test_well_sealed_but_invalid_body(tmp_path, body):
    data = struct.pack("<4sHHI", b"NCSK", 1, 0, len(body)) + body
    data += struct.pack("<I", crc32c.crc32c(data))
    with pytest.raises(CorruptData, match="invalid body") as e:
        decode(data, tmp_path / "x.control")
    assert "x.control" in str(e.value)


def test_body_with_descending_history_is_corrupt():
    import json

    obj = json.loads(encode(make_state())[12:-4])
    obj["term_history"] = [[3, 10], [1, 20]]
    body = json.dumps(obj).encode()
    data = struct.pack("<4sHHI", b"NCSK", 1, 0, len(body)) + body
    with pytest.raises(CorruptData, match="not ascending"):
        decode(data + struct.pack("<I", crc32c.crc32c(data)), "sk1/safekeeper.control")


def test_leftover_partial_is_ignored(saved):
    path, state = saved
    partial = path.with_name(CONTROL_FILE_NAME + ".partial")
    partial.write_bytes(b"half-written garbage from a crash")
    assert load(path) == state
    newer = make_state(term=6, term_history=state.term_history + [TermSwitch(6, 0x1004000)])
    save(path, newer)
    assert load(path) == newer
    assert not partial.exists()


def test_crash_before_rename_keeps_old_file(saved, monkeypatch):
    path, state = saved

    def crash(src, dst):
        raise OSError("power lost")

    monkeypatch.setattr(control_file.os, "replace", crash)
    with pytest.raises(OSError):
        save(path, make_state(term=9))
    monkeypatch.undo()
    assert load(path) == state  # the new state only reached .partial


def test_save_fsyncs_file_then_directory(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(control_file.os, "fsync", spy)
    save(tmp_path / CONTROL_FILE_NAME, make_state())
    assert synced == [str(tmp_path / (CONTROL_FILE_NAME + ".partial")), str(tmp_path)]


def test_missing_file(tmp_path):
    with pytest.raises(NotFound, match=str(tmp_path)):
        load(tmp_path / CONTROL_FILE_NAME)


@pytest.mark.parametrize(
    "bad",
    [
        {"timeline_id": "XYZ"},
        {"timeline_id": TLI.upper()},
        {"term": -1},
        {"flush_lsn": "0/16B3748"},
        {"wal_seg_size": 1000},
        {"term_history": [(2, 5), (1, 6)]},
        {"term": 2},  # history reaches term 5
        {"compute": {"hostname": "x"}},
    ],
)
def test_state_is_validated(bad):
    with pytest.raises(InvalidInput):
        make_state(**bad)


def test_last_log_term_follows_flush_lsn():
    s = make_state()
    assert last_log_term(s) == 5
    assert last_log_term(s, flush_lsn=0x1002FFF) == 3
    assert last_log_term(s, flush_lsn=0x1003000) == 5  # a term that has started counts
    assert last_log_term(make_state(term_history=[], term=0)) == 0


lsns = st.integers(0, 2**64 - 1)


@st.composite
def states(draw):
    terms = sorted(draw(st.sets(st.integers(1, 2**63), max_size=6)))
    starts = sorted(draw(st.lists(lsns, min_size=len(terms), max_size=len(terms))))
    compute = draw(
        st.none()
        | st.fixed_dictionaries(
            {"host": st.text(max_size=20), "port": st.integers(1, 65535)},
            optional={"user": st.text(max_size=10), "app_name": st.text(max_size=10)},
        )
    )
    return TimelineState(
        timeline_id=draw(st.text("0123456789abcdef", min_size=32, max_size=32)),
        system_id=draw(lsns),
        pg_version=draw(st.integers(14, 18)),
        wal_seg_size=2 ** draw(st.integers(20, 30)),
        term=draw(st.integers(terms[-1] if terms else 0, 2**63)),
        term_history=[TermSwitch(t, s) for t, s in zip(terms, starts, strict=False)],
        timeline_start_lsn=draw(lsns),
        flush_lsn=draw(lsns),
        commit_lsn=draw(lsns),
        backup_lsn=draw(lsns),
        peer_horizon_lsn=draw(lsns),
        remote_consistent_lsn=draw(lsns),
        compute=compute,
    )


@settings(max_examples=100, deadline=None)
@given(states())
def test_encode_decode_round_trip(state):
    assert decode(encode(state)) == state
