"""Key: byte layout, ordering, text form, constructors and key ranges."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neonctl.engine.pageserver.key import (
    FULL_KEY_RANGE,
    KEY_SIZE,
    MAX_KEY,
    MIN_KEY,
    Key,
    KeyRange,
    SlruKind,
    checkpoint_key,
    controlfile_key,
    dbdir_key,
    rel_block_key,
    rel_key_range,
    rel_size_key,
    reldir_key,
    relmap_key,
    slru_block_key,
    slru_dir_key,
    slru_seg_size_key,
)
from neonctl.errors import InvalidInput

u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFFFFFF)
# Small values collide often, which exercises equal prefixes in comparisons.
field32 = st.one_of(st.integers(0, 3), u32)
keys = st.builds(Key, u8, field32, field32, field32, u8, field32)


def test_layout_matches_neon() -> None:
    key = rel_block_key(1663, 5, 16384, 0, 7)
    assert str(key) == "000000067F00000005000040000000000007"
    assert key.to_bytes() == bytes.fromhex(str(key))
    assert len(key.to_bytes()) == KEY_SIZE
    assert str(MIN_KEY) == "0" * 36
    assert str(MAX_KEY) == "F" * 36
    assert repr(key) == "Key(000000067F00000005000040000000000007)"


@settings(max_examples=100)
@given(keys, keys)
def test_order_is_byte_order(a: Key, b: Key) -> None:
    assert (a < b) == (a.to_bytes() < b.to_bytes())
    assert (a == b) == (a.to_bytes() == b.to_bytes())
    assert (a.to_int() < b.to_int()) == (a < b)


@settings(max_examples=100)
@given(keys)
def test_round_trips(key: Key) -> None:
    assert Key.from_bytes(key.to_bytes()) == key
    assert Key.parse(str(key)) == key
    assert Key.parse(str(key).lower()) == key
    assert Key.from_int(key.to_int()) == key
    assert pickle.loads(pickle.dumps(key)) == key
    assert hash(Key.parse(str(key))) == hash(key)
    assert isinstance(Key.from_bytes(key.to_bytes()), Key)


@settings(max_examples=100)
@given(keys)
def test_next_is_successor(key: Key) -> None:
    if key == MAX_KEY:
        with pytest.raises(ValueError):
            key.next()
        return
    nxt = key.next()
    assert key < nxt
    assert nxt.to_int() == key.to_int() + 1
    assert KeyRange(key, nxt).contains(key)
    assert not KeyRange(key, nxt).contains(nxt)


def test_next_carries_across_fields() -> None:
    assert Key(0, 0, 0, 0, 0, 0xFFFFFFFF).next() == Key(0, 0, 0, 0, 1, 0)
    assert Key(0, 0, 0, 0, 0xFF, 0xFFFFFFFF).next() == Key(0, 0, 0, 1, 0, 0)


@pytest.mark.parametrize(
    "fields",
    [
        (256, 0, 0, 0, 0, 0),
        (0, 1 << 32, 0, 0, 0, 0),
        (0, 0, -1, 0, 0, 0),
        (0, 0, 0, 0, 256, 0),
        (0, 0, 0, 0, 0, 1 << 32),
    ],
)
def test_field_ranges_enforced(fields: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        Key(*fields)


@pytest.mark.parametrize(
    "text", ["", "00", "0" * 35, "0" * 37, "G" * 36, "0" * 36 + "\n", " " + "0" * 35, "0" * 34 + "  "]
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidInput):
        Key.parse(text)


def test_from_bytes_rejects_wrong_length() -> None:
    with pytest.raises(ValueError):
        Key.from_bytes(bytes(17))
    with pytest.raises(ValueError):
        Key.from_int(1 << 144)


def test_rel_size_sorts_right_after_the_last_block() -> None:
    last_block = rel_block_key(1663, 5, 16384, 0, 0xFFFFFFFE)
    size = rel_size_key(1663, 5, 16384, 0)
    assert last_block < size < rel_block_key(1663, 5, 16384, 1, 0)
    assert size.next() == Key(0, 1663, 5, 16384, 1, 0)
    fork = rel_key_range(1663, 5, 16384, 0)
    assert fork.contains(rel_block_key(1663, 5, 16384, 0, 0))
    assert fork.contains(size)
    assert not fork.contains(rel_block_key(1663, 5, 16384, 1, 0))
    assert not fork.contains(rel_size_key(1663, 5, 16383, 0))


def test_constructors_reject_colliding_arguments() -> None:
    with pytest.raises(ValueError):
        rel_block_key(1663, 5, 16384, 0, 0xFFFFFFFF)
    with pytest.raises(ValueError):
        rel_block_key(1663, 5, 0, 0, 1)
    with pytest.raises(ValueError):
        rel_size_key(1663, 5, 0, 0)
    with pytest.raises(ValueError):
        relmap_key(0, 0)
    with pytest.raises(ValueError):
        slru_block_key(SlruKind.CLOG, 0, 0xFFFFFFFF)
    with pytest.raises(ValueError):
        slru_dir_key(7)


PREDICATES = [
    "is_rel_block",
    "is_rel_size",
    "is_dbdir",
    "is_relmap",
    "is_reldir",
    "is_slru_dir",
    "is_slru_block",
    "is_slru_seg_size",
    "is_controlfile",
    "is_checkpoint",
]


@pytest.mark.parametrize(
    ("key", "predicate"),
    [
        (rel_block_key(1663, 5, 16384, 2, 9), "is_rel_block"),
        (rel_size_key(1663, 5, 16384, 2), "is_rel_size"),
        (dbdir_key(), "is_dbdir"),
        (relmap_key(1664, 0), "is_relmap"),
        (reldir_key(1663, 5), "is_reldir"),
        (slru_dir_key(SlruKind.MULTIXACT_OFFSETS), "is_slru_dir"),
        (slru_block_key(SlruKind.CLOG, 3, 17), "is_slru_block"),
        (slru_seg_size_key(SlruKind.MULTIXACT_MEMBERS, 3), "is_slru_seg_size"),
        (controlfile_key(), "is_controlfile"),
        (checkpoint_key(), "is_checkpoint"),
    ],
)
def test_each_constructor_matches_exactly_one_predicate(key: Key, predicate: str) -> None:
    assert [p for p in PREDICATES if getattr(key, p)()] == [predicate]


def test_key_prefixes_match_neon() -> None:
    assert relmap_key(1663, 5) == Key(0, 1663, 5, 0, 0, 0)
    assert reldir_key(1663, 5) == Key(0, 1663, 5, 0, 0, 1)
    assert slru_dir_key(SlruKind.CLOG) == Key(1, 0, 0, 0, 0, 0)
    assert slru_block_key(SlruKind.MULTIXACT_OFFSETS, 4, 5) == Key(1, 2, 1, 4, 0, 5)
    assert slru_seg_size_key(SlruKind.CLOG, 4) == Key(1, 0, 1, 4, 0, 0xFFFFFFFF)
    assert controlfile_key() == Key(3, 0, 0, 0, 0, 0)
    assert checkpoint_key() == Key(3, 0, 0, 0, 0, 1)
    assert rel_block_key(1663, 5, 16384, 2, 9).rel_tag() == (1663, 5, 16384, 2)
    with pytest.raises(ValueError):
        reldir_key(1663, 5).rel_tag()


@settings(max_examples=100)
@given(keys, keys, keys, keys, keys)
def test_key_range_matches_definition(a: Key, b: Key, c: Key, d: Key, probe: Key) -> None:
    r1, r2 = KeyRange(a, b), KeyRange(c, d)
    assert r1.contains(probe) == (a <= probe < b)
    assert r1.is_empty() == (a >= b)
    # Two half-open ranges overlap iff some key lies in both.
    if not r1.is_empty() and not r2.is_empty():
        lo, hi = max(a, c), min(b, d)
        assert r1.overlaps(r2) == (lo < hi) == r2.overlaps(r1)
        if r1.overlaps(r2):
            assert r1.contains(lo) and r2.contains(lo)
    else:
        assert not r1.overlaps(r2)


def test_key_range_text_and_full_range() -> None:
    assert str(KeyRange(MIN_KEY, MAX_KEY)) == "0" * 36 + "-" + "F" * 36
    assert FULL_KEY_RANGE.contains(MIN_KEY)
    assert not FULL_KEY_RANGE.contains(MAX_KEY)
    assert KeyRange(MIN_KEY, MIN_KEY.next()).overlaps(FULL_KEY_RANGE)
    assert not KeyRange(MIN_KEY, MIN_KEY.next()).overlaps(KeyRange(MIN_KEY.next(), MAX_KEY))
