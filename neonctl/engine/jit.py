"""What every JIT-compiled (numba) kernel shares: its compile settings, byte loads, CRC-32C, range copies.

Kernels are compiled once per machine and cached next to their module
(``cache=True``) and release the GIL (``nogil=True``), so the pageserver's
layer builder runs beside its WAL receiver on the other core. Layer blobs,
B-tree nodes and WAL records each carry a CRC-32C. Checking or
computing one per value from Python costs a call and a slice per value - more
than the rest of ingest together for ~90-byte WAL records - so the bulk paths
compute them in numba loops with this slice-by-8 table. Single checksums
outside hot loops keep using the ``crc32c`` package; the tests check both agree.
"""

from __future__ import annotations

import llvmlite.binding
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

jit = numba.njit(cache=True, nogil=True)  # small helpers get inlined by LLVM (numba-level inlining compiles 2x slower)


def _crc32c_tables() -> np.ndarray:
    """Slice-by-8 tables for CRC-32C (reflected polynomial 0x82F63B78); int64 so numba stays signed."""
    t = np.zeros((8, 256), dtype=np.int64)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t[0, i] = c
    for k in range(1, 8):
        t[k] = (t[k - 1] >> 8) ^ t[0][t[k - 1] & 0xFF]
    return t


CRC_TABLE = _crc32c_tables()


@jit
def byte_at(a, i):
    """a[i] as int64. Indexing with uint64 spares numba's negative-index wraparound code, which
    would otherwise cost a compare and cmov per byte and stop LLVM from merging loads."""
    return np.int64(a[np.uint64(i)])


@jit
def u16_le(a, i):
    return byte_at(a, i) | (byte_at(a, i + 1) << 8)


@jit
def u32_le(a, i):
    return byte_at(a, i) | (byte_at(a, i + 1) << 8) | (byte_at(a, i + 2) << 16) | (byte_at(a, i + 3) << 24)


@jit
def u64_le(a, i):
    return u32_le(a, i) | (u32_le(a, i + 4) << 32)  # bit pattern; wraps to negative above 2**63


# x86-64 CPUs since 2008 compute CRC-32C in hardware (SSE4.2): ~5x the table. Kernels are compiled
# for the host CPU, so the choice is made here, once, from what this CPU has.
HARDWARE_CRC = bool(llvmlite.binding.get_host_cpu_features().get("sse4.2"))


def _crc_instruction(name: str, width: int):
    @intrinsic
    def crc32(typingctx, state, word):
        def codegen(context, builder, signature, args):
            fnty = ir.FunctionType(
                ir.IntType(32 if width < 64 else 64), [ir.IntType(32 if width < 64 else 64), ir.IntType(width)]
            )
            fn = cgutils.get_or_insert_function(builder.module, fnty, name)
            s = builder.trunc(args[0], ir.IntType(32)) if width < 64 else args[0]
            w = builder.trunc(args[1], ir.IntType(width))
            r = builder.call(fn, [s, w])
            return builder.zext(r, ir.IntType(64)) if width < 64 else r

        return types.int64(types.int64, types.int64), codegen

    return crc32


_crc_u64 = _crc_instruction("llvm.x86.sse42.crc32.64.64", 64)
_crc_u8 = _crc_instruction("llvm.x86.sse42.crc32.32.8", 8)


@jit
def _crc32c_hardware(tab, a, i, end, s):
    while end - i >= 8:
        s = _crc_u64(s, u64_le(a, i))
        i += 8
    while i < end:
        s = _crc_u8(s, byte_at(a, i))
        i += 1
    return s


@jit
def _crc32c_table(tab, a, i, end, s):
    """Advance the (uninverted) CRC-32C state s over a[i:end], eight bytes per step."""
    while end - i >= 8:
        w = s ^ u32_le(a, i)
        s = (
            tab[7, w & 255]
            ^ tab[6, (w >> 8) & 255]
            ^ tab[5, (w >> 16) & 255]
            ^ tab[4, w >> 24]
            ^ tab[3, byte_at(a, i + 4)]
            ^ tab[2, byte_at(a, i + 5)]
            ^ tab[1, byte_at(a, i + 6)]
            ^ tab[0, byte_at(a, i + 7)]
        )
        i += 8
    while i < end:
        s = tab[0, (s ^ byte_at(a, i)) & 255] ^ (s >> 8)
        i += 1
    return s


crc32c_update = _crc32c_hardware if HARDWARE_CRC else _crc32c_table
"""Advance the CRC-32C state s (pre-inverted: start from 0xFFFFFFFF) over a[i:end]."""


@jit
def _copy_and_crc_hardware(src, s, out, d, n, state, tab):
    k = np.int64(0)
    while n - k >= 8:
        w = u64_le(src, s + k)
        state = _crc_u64(state, w)
        o = np.uint64(d + k)
        for j in range(8):
            out[o + np.uint64(j)] = (w >> (8 * j)) & 0xFF
        k += 8
    while k < n:
        b = byte_at(src, s + k)
        state = _crc_u8(state, b)
        out[np.uint64(d + k)] = b
        k += 1
    return state


@jit
def _copy_and_crc_table(src, s, out, d, n, state, tab):
    for k in range(n):
        out[np.uint64(d + k)] = src[np.uint64(s + k)]
    return _crc32c_table(tab, out, d, d + n, state)


copy_and_crc = _copy_and_crc_hardware if HARDWARE_CRC else _copy_and_crc_table
"""Copy src[s:s+n] to out[d:d+n] and advance the CRC-32C state over those bytes, in one pass."""


@jit
def crc32c_range(a, start, end, tab):
    """The finished CRC-32C of ``a[start:end]`` (same value as ``crc32c.crc32c(bytes)``)."""
    return crc32c_update(tab, a, np.int64(start), np.int64(end), np.int64(0xFFFFFFFF)) ^ 0xFFFFFFFF


@jit
def copy_ranges(src, src_off, length, dest, dest_off):
    """dest[dest_off[i]:dest_off[i] + length[i]] = src[src_off[i]:src_off[i] + length[i]] for every i."""
    for i in range(length.shape[0]):  # a plain loop: numba's slice assignment copies through a temporary
        s, d = np.uint64(src_off[i]), np.uint64(dest_off[i])
        for k in range(np.uint64(length[i])):
            dest[d + k] = src[s + k]
