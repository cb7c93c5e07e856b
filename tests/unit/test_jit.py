"""The JIT kernels' CRC-32C: hardware and table paths agree with the crc32c package on any slice."""

import numpy as np
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from neonctl.engine import jit


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.data())
def test_crc32c_paths_match_package(data, draw):
    a = np.frombuffer(data or b"\0", dtype=np.uint8)
    i = draw.draw(st.integers(0, len(data)))
    j = draw.draw(st.integers(i, len(data)))
    want = crc32c(data[i:j])
    assert jit.crc32c_range(a, i, j, jit.CRC_TABLE) == want
    state = jit._crc32c_table(jit.CRC_TABLE, a, np.int64(i), np.int64(j), np.int64(0xFFFFFFFF))
    assert state ^ 0xFFFFFFFF == want
    if jit.HARDWARE_CRC:
        state = jit._crc32c_hardware(jit.CRC_TABLE, a, np.int64(i), np.int64(j), np.int64(0xFFFFFFFF))
        assert state ^ 0xFFFFFFFF == want


def test_byte_loads_are_little_endian():
    a = np.frombuffer(bytes(range(1, 9)), dtype=np.uint8)
    assert jit.u16_le(a, 0) == 0x0201
    assert jit.u32_le(a, 1) == 0x05040302
    assert jit.u64_le(a, 0) == 0x0807060504030201
