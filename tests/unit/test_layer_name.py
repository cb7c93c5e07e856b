"""Layer names: exact Neon form, round trips both ways, strict rejection."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from neonctl.engine.pageserver.key import MAX_KEY, MIN_KEY, Key, KeyRange, rel_key_range
from neonctl.engine.pageserver.storage_layer.layer_name import (
    DeltaLayerName,
    ImageLayerName,
    parse_layer_name,
)
from neonctl.errors import InvalidInput

keys = st.builds(Key.from_int, st.integers(0, 2**144 - 1))
lsns = st.integers(0, 2**64 - 1)

DELTA = "000000000000000000000000000000000000-FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF__000000000169B7F8-0000000001A1D3C0"
IMAGE = "000000067F00000005000040000000000000-000000067F00000005000040000100000000__000000000169B7F8"


def test_known_names() -> None:
    delta = parse_layer_name(DELTA)
    assert delta == DeltaLayerName(KeyRange(MIN_KEY, MAX_KEY), 0x169B7F8, 0x1A1D3C0)
    assert str(delta) == DELTA
    image = parse_layer_name(IMAGE)
    assert image == ImageLayerName(rel_key_range(1663, 5, 16384, 0), 0x169B7F8)
    assert str(image) == IMAGE
    assert DeltaLayerName.parse(DELTA) == delta
    assert ImageLayerName.parse(IMAGE) == image
    with pytest.raises(InvalidInput, match="image layer name"):
        DeltaLayerName.parse(IMAGE)
    with pytest.raises(InvalidInput, match="delta layer name"):
        ImageLayerName.parse(DELTA)


@settings(max_examples=100)
@given(keys, keys, lsns, lsns)
def test_delta_round_trip(a: Key, b: Key, l1: int, l2: int) -> None:
    assume(a != b and l1 != l2)
    name = DeltaLayerName(KeyRange(min(a, b), max(a, b)), min(l1, l2), max(l1, l2))
    text = str(name)
    assert len(text) == 36 * 2 + 1 + 2 + 16 * 2 + 1
    assert parse_layer_name(text) == name
    assert str(parse_layer_name(text)) == text


@settings(max_examples=100)
@given(keys, keys, st.integers(0, 2**64 - 2))
def test_image_round_trip(a: Key, b: Key, lsn: int) -> None:
    assume(a != b)
    name = ImageLayerName(KeyRange(min(a, b), max(a, b)), lsn)
    assert parse_layer_name(str(name)) == name
    assert str(parse_layer_name(str(name))) == str(name)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        DELTA.lower(),  # only the canonical upper-case form: one layer, one name
        DELTA + "\n",
        DELTA + ".tmp",
        DELTA[1:],
        DELTA.replace("__", "_"),
        DELTA.replace("-", "_", 1),
        IMAGE + "-",
        IMAGE[:-1],
        " " + IMAGE,
        # empty or inverted ranges
        f"{MAX_KEY}-{MIN_KEY}__0000000000000001",
        f"{MIN_KEY}-{MIN_KEY}__0000000000000001",
        f"{MIN_KEY}-{MAX_KEY}__0000000000000002-0000000000000002",
        f"{MIN_KEY}-{MAX_KEY}__0000000000000003-0000000000000002",
        f"{MIN_KEY}-{MAX_KEY}__FFFFFFFFFFFFFFFF",  # an image at the maximum LSN has no end LSN
    ],
)
def test_rejects(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_layer_name(text)


def test_constructors_validate() -> None:
    with pytest.raises(ValueError):
        DeltaLayerName(KeyRange(MIN_KEY, MAX_KEY), 5, 5)
    with pytest.raises(ValueError):
        DeltaLayerName(KeyRange(MIN_KEY, MAX_KEY), 0, 2**64)
    with pytest.raises(ValueError):
        ImageLayerName(KeyRange(MAX_KEY, MIN_KEY), 5)
    with pytest.raises(ValueError):
        ImageLayerName(KeyRange(MIN_KEY, MAX_KEY), -1)


def test_names_are_hashable_values() -> None:
    a = parse_layer_name(DELTA)
    b = parse_layer_name(DELTA)
    assert a == b and hash(a) == hash(b) and len({a, b, parse_layer_name(IMAGE)}) == 2
