"""Delta layers: round trips against a model, the will_init stopping rule, writer checks, damage."""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neonctl.engine.pageserver.key import (
    MAX_KEY,
    MIN_KEY,
    Key,
    KeyRange,
    rel_block_key,
    rel_size_key,
)
from neonctl.engine.pageserver.storage_layer.delta_layer import (
    DeltaLayerInfo,
    DeltaLayerReader,
    DeltaLayerWriter,
)
from neonctl.engine.pageserver.storage_layer.image_layer import ImageLayerWriter
from neonctl.engine.pageserver.storage_layer.layer_file import BLOCK_SIZE
from neonctl.engine.pageserver.storage_layer.layer_name import DeltaLayerName
from neonctl.errors import CorruptData

TL = "0123456789abcdef0123456789abcdef"
KEYS = [rel_block_key(1663, 5, 16384, 0, b) for b in range(6)] + [
    rel_size_key(1663, 5, 16384, 0),
    rel_block_key(1663, 5, 16385, 1, 0),
]
LSN_START = 0x1000
Entry = tuple[Key, int, bytes, bool]


def write_layer(path: Path, entries: list[Entry], key_end: Key = MAX_KEY, lsn_end: int = 0x10000) -> DeltaLayerInfo:
    with DeltaLayerWriter(path, TL, MIN_KEY, LSN_START) as writer:
        for key, lsn, value, will_init in entries:
            writer.put(key, lsn, value, will_init)
        return writer.finish(key_end, lsn_end)


def model_get(entries: list[Entry], key: Key, lsn_end: int) -> list[tuple[int, bool, bytes]]:
    out = []
    for k, lsn, value, will_init in sorted(entries, key=lambda e: e[1], reverse=True):
        if k == key and lsn < lsn_end:
            out.append((lsn, will_init, value))
            if will_init:
                break
    return out


values = st.one_of(
    st.binary(max_size=140),  # around the 1-byte / 4-byte header boundary at 128
    st.builds(lambda n, seed: random.Random(seed).randbytes(n), st.integers(0, 9000), st.integers()),
)
entry_lists = st.lists(
    st.tuples(st.sampled_from(KEYS), st.integers(LSN_START, LSN_START + 0x200), values, st.booleans()),
    unique_by=lambda e: (e[0], e[1]),
    max_size=80,
).map(lambda es: sorted(es, key=lambda e: (e[0], e[1])))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entry_lists, st.lists(st.integers(0, LSN_START + 0x300), max_size=6))
def test_round_trip_matches_model(entries: list[Entry], probe_lsns: list[int]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "layer"
        info = write_layer(path, entries)
        assert os.listdir(d) == ["layer"]
        assert info.file_size == path.stat().st_size
        assert info.num_values == len(entries)
        with DeltaLayerReader(path) as reader:
            assert reader.summary.timeline_id == TL
            assert reader.name == info.name
            assert [(k, lsn, v, w) for k, lsn, w, v in reader.iter_all()] == entries
            assert list(reader.iter_index()) == [(k, lsn, w) for k, lsn, _, w in entries]
            assert list(reader.keys()) == sorted({e[0] for e in entries})
            for key in KEYS:
                for lsn_end in [*probe_lsns, 0, LSN_START, 2**64, 2**64 + 5]:
                    assert reader.get_values(key, lsn_end) == model_get(entries, key, lsn_end)


def test_summary_and_name(tmp_path: Path) -> None:
    key_end = KEYS[-1].next()
    info = write_layer(tmp_path / "l", [(KEYS[0], LSN_START, b"x", True)], key_end, 0x2000)
    assert info.key_range == KeyRange(MIN_KEY, key_end)
    assert (info.lsn_start, info.lsn_end) == (LSN_START, 0x2000)
    assert str(info.name) == f"{MIN_KEY}-{key_end}__0000000000001000-0000000000002000"
    assert DeltaLayerName.parse(str(info.name)) == info.name
    with DeltaLayerReader(tmp_path / "l") as reader:
        s = reader.summary
        assert (s.magic, s.format_version) == (0x5A61, 1)
        assert (reader.key_range, reader.lsn_start, reader.lsn_end) == (info.key_range, LSN_START, 0x2000)
        assert reader.get_values(key_end, 2**64) == []  # outside the key range


def test_lookup_reads_only_the_blobs_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = KEYS[0]
    entries = [(key, LSN_START + i, b"v%d" % i, i % 4 == 0) for i in range(10)]
    write_layer(tmp_path / "l", entries)
    with DeltaLayerReader(tmp_path / "l") as reader:
        reads: list[int] = []
        real = reader._file.read_blobs
        monkeypatch.setattr(reader._file, "read_blobs", lambda offsets: reads.extend(offsets) or real(offsets))
        got = reader.get_values(key, LSN_START + 7)
        assert [lsn - LSN_START for lsn, _, _ in got] == [6, 5, 4]
        assert got[-1] == (LSN_START + 4, True, b"v4")
        assert len(reads) == 3


def test_large_and_boundary_values(tmp_path: Path) -> None:
    big = random.Random(0).randbytes(3 << 20)
    small = [b"", b"a" * 127, b"b" * 128]
    # KEYS[0]: the big value last (read past the batched span); KEYS[1]: first (span too long to batch).
    entries = [(KEYS[0], LSN_START + i, v, False) for i, v in enumerate([*small, big])]
    entries += [(KEYS[1], LSN_START + i, v, False) for i, v in enumerate([big, *small])]
    write_layer(tmp_path / "l", entries)
    with DeltaLayerReader(tmp_path / "l") as reader:
        assert [v for _, _, _, v in reader.iter_all()] == [e[2] for e in entries]
        for key in KEYS[:2]:
            assert reader.get_values(key, 2**64) == model_get(entries, key, 2**64)


def test_empty_layer(tmp_path: Path) -> None:
    write_layer(tmp_path / "l", [])
    with DeltaLayerReader(tmp_path / "l") as reader:
        assert list(reader.iter_all()) == []
        assert reader.get_values(KEYS[0], 2**64) == []


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with DeltaLayerWriter(tmp_path / "l", TL, KEYS[1], LSN_START) as w:
        with pytest.raises(ValueError):
            w.put(KEYS[0], LSN_START, b"", True)  # below key_start
        with pytest.raises(ValueError):
            w.put(KEYS[1], LSN_START - 1, b"", True)  # below lsn_start
        w.put(KEYS[2], LSN_START + 5, b"", True)
        with pytest.raises(ValueError):
            w.put(KEYS[2], LSN_START + 5, b"", True)  # duplicate
        with pytest.raises(ValueError):
            w.put(KEYS[2], LSN_START + 4, b"", True)  # LSN going back within a key
        with pytest.raises(ValueError):
            w.put(KEYS[1], LSN_START + 9, b"", True)  # key going back
        w.put(KEYS[3], LSN_START, b"", True)  # the writer is still usable
        with pytest.raises(ValueError):
            w.finish(KEYS[3], 0x2000)  # key_end must be above the last key
    with DeltaLayerWriter(tmp_path / "l", TL, KEYS[0], LSN_START) as w:
        w.put(KEYS[0], LSN_START + 5, b"", True)
        with pytest.raises(ValueError):
            w.finish(MAX_KEY, LSN_START + 5)  # lsn_end must be above every LSN
    with pytest.raises(ValueError):
        DeltaLayerWriter(tmp_path / "l", "not-hex", KEYS[0], LSN_START)
    with pytest.raises(ValueError):
        DeltaLayerWriter(tmp_path / "l", bytes(15), KEYS[0], LSN_START)
    with pytest.raises(ValueError):
        DeltaLayerWriter(tmp_path / "l", TL, KEYS[0], 2**64)
    w = DeltaLayerWriter(tmp_path / "l", TL, KEYS[1], LSN_START)
    with pytest.raises(ValueError):
        w.finish(KEYS[1], 0x2000)  # an empty key range
    w.abort()
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), DeltaLayerWriter(tmp_path / "l", TL, MIN_KEY, LSN_START) as w:
        w.put(KEYS[0], LSN_START, b"x" * 1000, True)
        raise RuntimeError("compaction cancelled")
    assert os.listdir(tmp_path) == []


# -- damage -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Entry]]:
    rng = random.Random(7)
    entries = [
        (rel_block_key(1663, 5, 16384, 0, b), LSN_START + i, rng.randbytes(rng.choice([40, 200, 8192])), i == 0)
        for b in range(600)
        for i in range(4)
    ]
    path = tmp_path_factory.mktemp("delta") / "layer"
    write_layer(path, entries)
    return path, entries


def read_everything(path: Path) -> list[tuple[Key, int, bool, bytes]]:
    with DeltaLayerReader(path) as reader:
        got = list(reader.iter_all())
        for key in reader.keys():  # noqa: SIM118 - a layer reader
            reader.get_values(key, 2**64)
        return got


def damaged_copy(src: Path, dst: Path, bit: int | None = None, size: int | None = None) -> Path:
    data = bytearray(src.read_bytes())
    if bit is not None:
        data[bit // 8] ^= 1 << (bit % 8)
    dst.write_bytes(bytes(data[:size]))
    return dst


def index_start(path: Path) -> int:
    with DeltaLayerReader(path) as reader:
        assert reader.summary.index_root_blk > reader.summary.index_start_blk, "want a multi-block index"
        return reader.summary.index_start_blk * BLOCK_SIZE


@pytest.mark.parametrize("cut", [0, 100, BLOCK_SIZE, BLOCK_SIZE + 1, -BLOCK_SIZE, -1])
def test_truncated_file(layer: tuple[Path, list[Entry]], tmp_path: Path, cut: int) -> None:
    path, _ = layer
    size = cut if cut >= 0 else path.stat().st_size + cut
    bad = damaged_copy(path, tmp_path / "bad", size=size)
    with pytest.raises(CorruptData, match=re.escape(str(bad))):
        read_everything(bad)


@pytest.mark.parametrize("region", ["summary", "summary padding", "values", "index"])
def test_flipped_bit(layer: tuple[Path, list[Entry]], tmp_path: Path, region: str) -> None:
    path, _ = layer
    offset = {
        "summary": 60,
        "summary padding": 5000,
        "values": BLOCK_SIZE + 3,
        "index": index_start(path) + 40,
    }[region]
    bad = damaged_copy(path, tmp_path / "bad", bit=offset * 8 + 2)
    with pytest.raises(CorruptData, match=re.escape(str(bad))):
        read_everything(bad)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_flipped_bit_is_caught_or_harmless(
    layer: tuple[Path, list[Entry]], tmp_path: Path, data: st.DataObject
) -> None:
    path, entries = layer
    bit = data.draw(st.integers(0, path.stat().st_size * 8 - 1))
    bad = damaged_copy(path, tmp_path / "bad", bit=bit)
    try:
        got = read_everything(bad)
    except CorruptData as e:
        assert str(bad) in str(e)
    else:  # only the zero padding before the index is not checksummed
        assert [(k, lsn, v, w) for k, lsn, w, v in got] == entries


def test_wrong_layer_kind(tmp_path: Path) -> None:
    with ImageLayerWriter(tmp_path / "img", TL, KeyRange(MIN_KEY, MAX_KEY), 0x1000) as w:
        w.put(KEYS[0], b"page")
        w.finish()
    with pytest.raises(CorruptData, match="wrong layer kind"):
        DeltaLayerReader(tmp_path / "img")
