"""Image layers: round trips, absence inside the range, compression, writer checks, damage."""

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
    rel_key_range,
)
from neonctl.engine.pageserver.storage_layer.delta_layer import DeltaLayerWriter
from neonctl.engine.pageserver.storage_layer.image_layer import (
    ImageLayerInfo,
    ImageLayerReader,
    ImageLayerWriter,
)
from neonctl.engine.pageserver.storage_layer.layer_file import BLOCK_SIZE
from neonctl.engine.pageserver.storage_layer.layer_name import ImageLayerName
from neonctl.errors import CorruptData

TL = "fedcba9876543210fedcba9876543210"
RANGE = rel_key_range(1663, 5, 16384, 0)
LSN = 0x169B7F8


def page(seed: int, kind: str) -> bytes:
    rng = random.Random(seed)
    if kind == "zero":
        return bytes(BLOCK_SIZE)
    if kind == "random":
        return rng.randbytes(BLOCK_SIZE)
    if kind == "mostly-empty":  # a heap page: header, free space, a few tuples at the end
        return rng.randbytes(24) + bytes(BLOCK_SIZE - 24 - 300) + rng.randbytes(300)
    return rng.randbytes(rng.randrange(0, 200))  # small non-page values (sizes, directories)


def write_layer(path: Path, items: list[tuple[Key, bytes]], key_range: KeyRange = RANGE) -> ImageLayerInfo:
    with ImageLayerWriter(path, TL, key_range, LSN) as writer:
        for key, value in items:
            writer.put(key, value)
        return writer.finish()


items_strategy = st.dictionaries(
    st.integers(0, 5000),
    st.tuples(st.integers(), st.sampled_from(["zero", "random", "mostly-empty", "small"])),
    max_size=150,
).map(lambda d: [(rel_block_key(1663, 5, 16384, 0, b), page(*d[b])) for b in sorted(d)])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items_strategy, st.lists(st.integers(0, 6000), max_size=20))
def test_round_trip(items: list[tuple[Key, bytes]], probes: list[int]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "layer"
        info = write_layer(path, items)
        assert os.listdir(d) == ["layer"]
        assert info.file_size == path.stat().st_size
        assert info.num_values == len(items)
        with ImageLayerReader(path) as reader:
            assert reader.name == info.name
            assert list(reader.iter_all()) == items
            bulk = reader.read_all()
            assert [(bulk.key(i), bulk.value(i)) for i in range(len(bulk))] == items
            assert list(reader.keys()) == [k for k, _ in items]
            stored = dict(items)
            for b in probes:
                key = rel_block_key(1663, 5, 16384, 0, b)
                assert reader.get(key) == stored.get(key)


def test_summary_name_and_absence(tmp_path: Path) -> None:
    key = rel_block_key(1663, 5, 16384, 0, 3)
    info = write_layer(tmp_path / "l", [(key, b"p" * 100)])
    assert info.name == ImageLayerName(RANGE, LSN)
    assert str(info.name) == f"{RANGE.start}-{RANGE.end}__000000000169B7F8"
    with ImageLayerReader(tmp_path / "l") as reader:
        s = reader.summary
        assert (s.magic, s.format_version, s.timeline_id) == (0x5A60, 1, TL)
        assert (s.lsn_start, s.lsn_end) == (LSN, LSN + 1)
        assert (reader.key_range, reader.lsn) == (RANGE, LSN)
        assert reader.get(key) == b"p" * 100
        assert reader.get(rel_block_key(1663, 5, 16384, 0, 4)) is None  # in range, absent: did not exist
        with pytest.raises(ValueError):
            reader.get(RANGE.end)  # outside the range the layer says nothing


def test_pages_are_compressed(tmp_path: Path) -> None:
    blocks = [rel_block_key(1663, 5, 16384, 0, b) for b in range(500)]
    zero = write_layer(tmp_path / "zero", [(k, bytes(BLOCK_SIZE)) for k in blocks])
    noise = write_layer(tmp_path / "noise", [(k, page(k.field6, "random")) for k in blocks])
    assert zero.file_size < 60 * 1024
    # Incompressible pages are stored as they are: header + page + checksum each, no growth.
    assert noise.file_size <= BLOCK_SIZE + 500 * (BLOCK_SIZE + 8) + 2 * BLOCK_SIZE
    with ImageLayerReader(tmp_path / "zero") as reader:
        assert all(v == bytes(BLOCK_SIZE) for _, v in reader.iter_all())


def test_many_keys_multi_level_index(tmp_path: Path) -> None:
    keys = [rel_block_key(1663, 5, rel, 0, b) for rel in range(16384, 16394) for b in range(0, 6000, 3)]
    write_layer(tmp_path / "l", [(k, k.to_bytes()) for k in keys], KeyRange(MIN_KEY, MAX_KEY))
    with ImageLayerReader(tmp_path / "l") as reader:
        assert reader.summary.index_root_blk - reader.summary.index_start_blk >= 2
        for k in random.Random(1).sample(keys, 200):
            assert reader.get(k) == k.to_bytes()
            assert reader.get(Key(*k[:5], k.field6 + 1)) is None
        assert sum(1 for _ in reader.keys()) == len(keys)  # noqa: SIM118 - a layer reader


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with ImageLayerWriter(tmp_path / "l", TL, RANGE, LSN) as w:
        with pytest.raises(ValueError):
            w.put(RANGE.end, b"")  # outside the range
        w.put(rel_block_key(1663, 5, 16384, 0, 5), b"")
        with pytest.raises(ValueError):
            w.put(rel_block_key(1663, 5, 16384, 0, 5), b"")
        with pytest.raises(ValueError):
            w.put(rel_block_key(1663, 5, 16384, 0, 4), b"")
    for bad_range, lsn in [(KeyRange(RANGE.end, RANGE.start), LSN), (RANGE, 2**64 - 1), (RANGE, -1)]:
        with pytest.raises(ValueError):
            ImageLayerWriter(tmp_path / "l", TL, bad_range, lsn)
    with pytest.raises(ValueError):
        ImageLayerWriter(tmp_path / "l", "xyz", RANGE, LSN)
    assert os.listdir(tmp_path) == []


def test_empty_layer(tmp_path: Path) -> None:
    write_layer(tmp_path / "l", [])
    with ImageLayerReader(tmp_path / "l") as reader:
        assert list(reader.iter_all()) == []
        assert reader.get(RANGE.start) is None


# -- damage -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[Key, bytes]]]:
    kinds = ["zero", "random", "mostly-empty", "small"]
    items = [(rel_block_key(1663, 5, 16384, 0, b), page(b, kinds[b // 2 % 4])) for b in range(0, 2400, 2)]
    path = tmp_path_factory.mktemp("image") / "layer"
    write_layer(path, items)
    return path, items


def read_everything(path: Path) -> list[tuple[Key, bytes]]:
    """Every value, key by key and in bulk (``read_all``): both return the same or both raise CorruptData."""
    outcomes: list = []
    for bulk in (False, True):
        try:
            with ImageLayerReader(path) as reader:
                if bulk:
                    v = reader.read_all()
                    outcomes.append([(v.key(i), v.value(i)) for i in range(len(v))])
                else:
                    got = list(reader.iter_all())
                    for key, _ in got[::50]:
                        reader.get(key)
                    outcomes.append(got)
        except CorruptData as e:
            outcomes.append(e)
    errors = [o for o in outcomes if isinstance(o, CorruptData)]
    assert len(errors) in (0, 2), outcomes
    if errors:
        assert str(path) in str(errors[1])
        raise errors[0]
    assert outcomes[0] == outcomes[1]
    return outcomes[0]


def damaged_copy(src: Path, dst: Path, bit: int | None = None, size: int | None = None) -> Path:
    data = bytearray(src.read_bytes())
    if bit is not None:
        data[bit // 8] ^= 1 << (bit % 8)
    dst.write_bytes(bytes(data[:size]))
    return dst


@pytest.mark.parametrize("cut", [0, 7, BLOCK_SIZE, 3 * BLOCK_SIZE + 5, -BLOCK_SIZE, -3])
def test_truncated_file(layer: tuple[Path, list], tmp_path: Path, cut: int) -> None:
    path, _ = layer
    bad = damaged_copy(path, tmp_path / "bad", size=cut if cut >= 0 else path.stat().st_size + cut)
    with pytest.raises(CorruptData, match=re.escape(str(bad))):
        read_everything(bad)


@pytest.mark.parametrize("region", ["summary", "compressed value", "raw value", "index root"])
def test_flipped_bit(layer: tuple[Path, list], tmp_path: Path, region: str) -> None:
    path, _ = layer
    with ImageLayerReader(path) as reader:
        offsets = {
            "summary": 10,
            "compressed value": BLOCK_SIZE + 6,  # block 0 is a zero page: a small zstd frame
            "raw value": reader._file.index.get(rel_block_key(1663, 5, 16384, 0, 2).to_bytes()) + 4000,  # random
            "index root": reader.summary.index_root_blk * BLOCK_SIZE + 20,
        }
    bad = damaged_copy(path, tmp_path / "bad", bit=offsets[region] * 8 + 7)
    with pytest.raises(CorruptData, match=re.escape(str(bad))):
        read_everything(bad)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_flipped_bit_is_caught_or_harmless(layer: tuple[Path, list], tmp_path: Path, data: st.DataObject) -> None:
    path, items = layer
    bit = data.draw(st.integers(0, path.stat().st_size * 8 - 1))
    bad = damaged_copy(path, tmp_path / "bad", bit=bit)
    try:
        got = read_everything(bad)
    except CorruptData as e:
        assert str(bad) in str(e)
    else:
        assert got == items


def test_wrong_layer_kind(tmp_path: Path) -> None:
    with DeltaLayerWriter(tmp_path / "delta", TL, MIN_KEY, 0x10) as w:
        w.finish(MAX_KEY, 0x20)
    with pytest.raises(CorruptData, match="wrong layer kind"):
        ImageLayerReader(tmp_path / "delta")
