"""disk_btree: round trips and range scans against a sorted list, input checks, damaged nodes."""

from __future__ import annotations

import bisect
import random
import struct
from itertools import islice

import crc32c
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from neonctl.engine.pageserver.storage_layer.disk_btree import (
    MAX_VALUE,
    NODE_SIZE,
    BTreeBuilder,
    BTreeReader,
)
from neonctl.errors import CorruptData


class MemBlocks:
    """Blocks in a dict, numbered from ``start_blk`` like a file region."""

    def __init__(self, start_blk: int = 0):
        self.start_blk = start_blk
        self.blocks: dict[int, bytes] = {}

    def write(self, block: bytes) -> None:
        assert len(block) == NODE_SIZE
        self.blocks[self.start_blk + len(self.blocks)] = block

    def read(self, blk: int) -> bytes:
        return self.blocks[blk]


def build(
    keys: list[bytes], key_len: int, start_blk: int = 0, cache_nodes: int = 128, values: list[int] | None = None
) -> tuple[BTreeReader, MemBlocks]:
    store = MemBlocks(start_blk)
    builder = BTreeBuilder(key_len, store.write, start_blk)
    for i, key in enumerate(keys):
        builder.append(key, values[i] if values else i)
    root, n_blocks = builder.finish()
    assert n_blocks == len(store.blocks)
    assert root == start_blk + n_blocks - 1, "the root is the last block written"
    return BTreeReader(store.read, root, key_len, name="mem", cache_nodes=cache_nodes), store


def depth(reader: BTreeReader, store: MemBlocks) -> int:
    return store.blocks[reader.root_blk][6] + 1


def make_keys(n: int, key_len: int, style: str, rng: random.Random) -> list[bytes]:
    n = min(n, 256**key_len)
    if style == "dense":  # consecutive integers: long shared prefixes, like one relation's blocks
        base = rng.randrange(256**key_len - n + 1)
        return [(base + i).to_bytes(key_len, "big") for i in range(n)]
    if style == "clustered":  # a few runs with gaps, like several relations with LSN suffixes
        out: set[int] = set()
        while len(out) < n:
            start = rng.randrange(256**key_len)
            out.update(range(start, min(start + rng.randrange(1, 5000), 256**key_len), rng.randrange(1, 7)))
        return [k.to_bytes(key_len, "big") for k in sorted(out)[:n]]
    if key_len <= 2:
        return [k.to_bytes(key_len, "big") for k in sorted(rng.sample(range(256**key_len), n))]
    return sorted({rng.randbytes(key_len) for _ in range(n)})


def expected_from(keys: list[bytes], start: bytes, forward: bool, limit: int | None = None) -> list[tuple[bytes, int]]:
    if forward:
        i = bisect.bisect_left(keys, start)
        stop = len(keys) if limit is None else min(len(keys), i + limit)
        return [(keys[j], j) for j in range(i, stop)]
    i = bisect.bisect_right(keys, start)
    stop = -1 if limit is None else max(-1, i - 1 - limit)
    return [(keys[j], j) for j in range(i - 1, stop, -1)]


def probe_keys(keys: list[bytes], key_len: int, rng: random.Random, count: int) -> list[bytes]:
    """Present keys, their neighbours (absent in sparse trees) and the extremes."""
    probes = [bytes(key_len), b"\xff" * key_len]
    for _ in range(count):
        probes.append(rng.randbytes(key_len))
        if keys:
            k = int.from_bytes(rng.choice(keys), "big")
            for d in (-1, 0, 1):
                if 0 <= k + d < 256**key_len:
                    probes.append((k + d).to_bytes(key_len, "big"))
    return probes


# Size classes are drawn uniformly (hypothesis favours small integers), the size within a class by seed.
SIZE_CLASSES = {"tiny": (0, 40), "small": (40, 3000), "medium": (3000, 10_000), "large": (10_000, 30_000)}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size_class=st.sampled_from(list(SIZE_CLASSES)),
    key_len=st.sampled_from([1, 2, 8, 26, 120, 255]),
    style=st.sampled_from(["random", "dense", "clustered"]),
    seed=st.integers(0, 2**32),
    start_blk=st.integers(0, 3),
    cache_nodes=st.sampled_from([1, 3, 128]),
)
@example(size_class="large", key_len=26, style="clustered", seed=5, start_blk=2, cache_nodes=3)
@example(size_class="medium", key_len=255, style="random", seed=6, start_blk=0, cache_nodes=128)
def test_matches_sorted_list(
    size_class: str, key_len: int, style: str, seed: int, start_blk: int, cache_nodes: int
) -> None:
    rng = random.Random(seed)
    n = rng.randrange(*SIZE_CLASSES[size_class])
    keys = make_keys(n, key_len, style, rng)
    reader, store = build(keys, key_len, start_blk, cache_nodes)
    event(f"depth {depth(reader, store)}")
    assert list(reader.iter_all()) == [(k, i) for i, k in enumerate(keys)]
    assert list(reader.iter_from(b"\xff" * key_len, forward=False)) == [(k, i) for i, k in enumerate(keys)][::-1]
    index = {k: i for i, k in enumerate(keys)}
    for probe in probe_keys(keys, key_len, rng, 40):
        assert reader.get(probe) == index.get(probe)
        for forward in (True, False):
            got = list(islice(reader.iter_from(probe, forward), 30))
            assert got == expected_from(keys, probe, forward, 30)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(min_size=2, max_size=2), unique=True, max_size=1500),
    st.lists(st.binary(min_size=2, max_size=2)),
)
def test_small_trees_with_arbitrary_probes(raw: list[bytes], probes: list[bytes]) -> None:
    keys = sorted(raw)
    reader, _ = build(keys, 2, cache_nodes=2)
    index = {k: i for i, k in enumerate(keys)}
    for probe in probes:
        assert reader.get(probe) == index.get(probe)
        assert list(reader.iter_from(probe)) == expected_from(keys, probe, True)
        assert list(reader.iter_from(probe, forward=False)) == expected_from(keys, probe, False)


def test_multi_level_trees() -> None:
    rng = random.Random(1)
    keys = make_keys(30_000, 255, "random", rng)  # 31 entries per node: four levels
    reader, store = build(keys, 255, cache_nodes=8)
    assert depth(reader, store) == 4
    for i in rng.sample(range(len(keys)), 300):
        assert reader.get(keys[i]) == i
    assert sum(1 for _ in reader.iter_all()) == len(keys)
    mid = keys[len(keys) // 2]
    assert next(reader.iter_from(mid, forward=False)) == (mid, len(keys) // 2)


def test_prefix_compression_raises_fan_out() -> None:
    rng = random.Random(2)
    _, dense = build(make_keys(20_000, 26, "dense", rng), 26)
    _, sparse = build(make_keys(20_000, 26, "random", rng), 26)
    # Shared prefixes leave ~2 suffix bytes per key instead of 26.
    assert len(dense.blocks) * 3 < len(sparse.blocks)


def test_empty_and_single() -> None:
    reader, store = build([], 4)
    assert len(store.blocks) == 1
    assert reader.get(b"abcd") is None
    assert list(reader.iter_all()) == []
    assert list(reader.iter_from(b"\xff" * 4, forward=False)) == []
    reader, _ = build([b"abcd"], 4, values=[MAX_VALUE - 1])
    assert reader.get(b"abcd") == MAX_VALUE - 1
    assert reader.get(b"abce") is None
    assert list(reader.iter_from(b"abcc")) == [(b"abcd", MAX_VALUE - 1)]
    assert list(reader.iter_from(b"abce")) == []
    assert list(reader.iter_from(b"abcc", forward=False)) == []


def test_builder_rejects_bad_input() -> None:
    store = MemBlocks()
    builder = BTreeBuilder(4, store.write)
    builder.append(b"bbbb", 1)
    with pytest.raises(ValueError, match="duplicate"):
        builder.append(b"bbbb", 2)
    with pytest.raises(ValueError, match="unsorted"):
        builder.append(b"aaaa", 2)
    with pytest.raises(ValueError):
        builder.append(b"ccc", 2)
    with pytest.raises(ValueError):
        builder.append(b"cccc", MAX_VALUE)
    with pytest.raises(ValueError):
        builder.append(b"cccc", -1)
    builder.append(b"cccc", 3)  # the builder is still usable after rejected input
    builder.finish()
    with pytest.raises(ValueError):
        builder.append(b"dddd", 4)
    with pytest.raises(ValueError):
        builder.finish()
    for bad_len in (0, 256):
        with pytest.raises(ValueError):
            BTreeBuilder(bad_len, store.write)
    reader, _ = build([b"abcd"], 4)
    with pytest.raises(ValueError):
        reader.get(b"abc")


def reseal(block: bytes | bytearray) -> bytes:
    """Recompute a node's checksum, forging a node the checksum alone cannot reject."""
    block = bytearray(block)
    struct.pack_into(">I", block, 0, crc32c.crc32c(memoryview(block)[4:]))
    return bytes(block)


def read_everything(reader: BTreeReader, keys: list[bytes]) -> None:
    list(reader.iter_all())
    list(reader.iter_from(b"\xff" * reader.key_len, forward=False))
    for key in keys:
        reader.get(key)


@pytest.fixture(scope="module")
def three_level() -> tuple[list[bytes], int, MemBlocks]:
    keys = make_keys(3000, 200, "random", random.Random(3))
    reader, store = build(keys, 200, start_blk=1)
    assert depth(reader, store) == 3
    return keys, reader.root_blk, store


def test_every_flipped_bit_is_caught(three_level: tuple[list[bytes], int, MemBlocks]) -> None:
    keys, root, store = three_level
    rng = random.Random(4)
    for blk in store.blocks:
        for _ in range(2):
            damaged = bytearray(store.blocks[blk])
            bit = rng.randrange(NODE_SIZE * 8)
            damaged[bit // 8] ^= 1 << (bit % 8)
            blocks = {**store.blocks, blk: bytes(damaged)}
            reader = BTreeReader(blocks.__getitem__, root, 200, name="layer-x")
            with pytest.raises(CorruptData, match=rf"layer-x: B-tree block {blk}: checksum"):
                read_everything(reader, keys)


def test_short_block(three_level: tuple[list[bytes], int, MemBlocks]) -> None:
    keys, root, store = three_level
    reader = BTreeReader(lambda blk: store.blocks[blk][:100], root, 200, name="layer-x")
    with pytest.raises(CorruptData, match=r"layer-x.*short read"):
        reader.get(keys[0])


def test_forged_nodes_are_rejected(three_level: tuple[list[bytes], int, MemBlocks]) -> None:
    keys, root, store = three_level
    node = store.blocks[root]
    n, _level, plen, slen = struct.unpack_from(">HBBB", node, 4)
    values_at = 9 + plen + n * slen

    def with_root(block: bytes) -> BTreeReader:
        return BTreeReader({**store.blocks, root: block}.__getitem__, root, 200, name="f")

    cyclic = bytearray(node)
    cyclic[values_at : values_at + 5] = root.to_bytes(5, "big")
    with pytest.raises(CorruptData, match="point backwards"):
        with_root(reseal(cyclic)).get(keys[0])

    skip_level = bytearray(node)
    skip_level[values_at : values_at + 5] = (1).to_bytes(5, "big")  # the first leaf, under a level-2 node
    with pytest.raises(CorruptData, match="level"):
        with_root(reseal(skip_level)).get(keys[0])

    bad_header = bytearray(node)
    bad_header[7] = plen + 1
    with pytest.raises(CorruptData, match="bad header"):
        with_root(reseal(bad_header)).get(keys[0])

    too_many = bytearray(node)
    struct.pack_into(">H", too_many, 4, 60000)
    with pytest.raises(CorruptData, match="entry count"):
        with_root(reseal(too_many)).get(keys[0])
