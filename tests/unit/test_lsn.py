import pytest

from neonctl.engine.lsn import (
    format_lsn,
    parse_lsn,
    parse_segment_file_name,
    segment_file_name,
)
from neonctl.errors import InvalidInput


@pytest.mark.parametrize("text,value", [("0/0", 0), ("0/16B3748", 0x16B3748), ("1/0", 1 << 32),
                                        ("FFFFFFFF/FFFFFFFF", 2**64 - 1), ("a/b", 0xA0000000B)])
def test_parse_and_format_round_trip(text, value):
    assert parse_lsn(text) == value
    assert parse_lsn(format_lsn(value)) == value


@pytest.mark.parametrize("bad", ["", "0", "0/", "/1", "0/1/2", "G/1", "123456789/0", "0x1/2", " 1 / 2"])
def test_parse_rejects_malformed(bad):
    with pytest.raises(InvalidInput):
        parse_lsn(bad)


def test_segment_names():
    assert segment_file_name(1) == "000000010000000000000001"
    assert segment_file_name(256) == "000000010000000100000000"
    assert parse_segment_file_name(segment_file_name(1234)) == 1234
