"""Full-page images as WAL records carry them: decompressed (pglz, lz4, zstd) and their hole put back.

A block reference may carry a copy of its whole page, stored without the run of zeros
between pd_lower and pd_upper (the "hole") and possibly compressed. Turning that back into
an 8 KiB page is separate from taking records apart (``decoder.py``): the pageserver also
does it for full-page images it stored as values (``value.page_image``), long after the
record was decoded. The decompressors follow PostgreSQL's formats byte for byte.
"""

from __future__ import annotations

from typing import Protocol

from neonctl.engine.wal.reader import WalDecodeError


class BlockImage(Protocol):
    """What restoring needs of a record's block reference (``decoder.BlockRef``) or a stored value."""

    bimg: bytes | None
    hole_offset: int
    hole_length: int

    @property
    def compression(self) -> str | None: ...


BLCKSZ = 8192


def restore_image(blk: BlockImage) -> bytes:
    """The full page of a block image: decompressed, with its hole put back."""
    raw = blk.bimg
    if raw is None:
        raise ValueError("block has no image")
    want = BLCKSZ - blk.hole_length
    method = blk.compression
    if method == "pglz":
        raw = pglz_decompress(raw, want)
    elif method == "lz4":
        raw = lz4_decompress(raw, want)
    elif method == "zstd":
        raw = zstd_decompress(raw, want)
    if len(raw) != want:
        raise WalDecodeError(f"block image of {blk!r} has {len(raw)} bytes, expected {want}")
    if blk.hole_length:
        return b"".join((raw[:blk.hole_offset], bytes(blk.hole_length), raw[blk.hole_offset:]))
    return bytes(raw)


def _copy_match(out: bytearray, off: int, length: int) -> None:
    start = len(out) - off
    if off >= length:
        out += out[start:start + length]
    else:  # overlapping copy: the last `off` bytes repeat
        out += (out[start:] * (length // off + 1))[:length]


def pglz_decompress(src: bytes, rawsize: int) -> bytes:
    """PostgreSQL's pglz format (pg_lzcompress.c); all of src must yield exactly rawsize bytes.

    A control byte's bits, lowest first, say whether each of the next eight items is a
    literal byte (0) or a back-reference (1: 2-3 bytes of length and offset).
    """
    out = bytearray()
    sp = dp = 0
    n = len(src)
    try:
        while sp < n and dp < rawsize:
            ctrl = src[sp]
            sp += 1
            if ctrl == 0:  # eight literals
                take = min(8, n - sp, rawsize - dp)
                out += src[sp:sp + take]
                sp += take
                dp += take
                continue
            for _ in range(8):
                if sp >= n or dp >= rawsize:
                    break
                if ctrl & 1:
                    b0 = src[sp]
                    off = ((b0 & 0xF0) << 4) | src[sp + 1]
                    length = (b0 & 0x0F) + 3
                    if length == 18:
                        length += src[sp + 2]
                        sp += 3
                    else:
                        sp += 2
                    length = min(length, rawsize - dp)
                    if off == 0 or off > dp:
                        raise WalDecodeError("corrupt pglz data: bad match offset")
                    start = dp - off
                    if off >= length:
                        out += out[start:start + length]
                    else:  # overlapping: the last `off` bytes repeat
                        out += (out[start:] * (length // off + 1))[:length]
                    dp += length
                else:
                    out.append(src[sp])
                    sp += 1
                    dp += 1
                ctrl >>= 1
    except IndexError:
        raise WalDecodeError("corrupt pglz data: truncated") from None
    if dp != rawsize or sp != n:
        raise WalDecodeError(f"corrupt pglz data: {dp} of {rawsize} bytes, {n - sp} input bytes left")
    return bytes(out)


def lz4_decompress(src: bytes, rawsize: int) -> bytes:
    """An LZ4 block (as LZ4_compress_default writes it); uses the lz4 package when installed."""
    try:
        import lz4.block
    except ImportError:
        return _lz4_block_decompress(src, rawsize)
    try:
        return lz4.block.decompress(src, uncompressed_size=rawsize)
    except lz4.block.LZ4BlockError as e:
        raise WalDecodeError(f"corrupt lz4 data: {e}") from None


def _lz4_block_decompress(src: bytes, rawsize: int) -> bytes:
    out = bytearray()
    sp = 0
    n = len(src)
    try:
        while sp < n:
            token = src[sp]
            sp += 1
            lit = token >> 4
            if lit == 15:
                while True:
                    b = src[sp]
                    sp += 1
                    lit += b
                    if b != 255:
                        break
            out += src[sp:sp + lit]
            sp += lit
            if sp >= n:
                break
            off = src[sp] | (src[sp + 1] << 8)
            sp += 2
            length = token & 15
            if length == 15:
                while True:
                    b = src[sp]
                    sp += 1
                    length += b
                    if b != 255:
                        break
            if off == 0 or off > len(out):
                raise WalDecodeError("corrupt lz4 data: bad match offset")
            _copy_match(out, off, length + 4)
            if len(out) > rawsize:
                break
    except IndexError:
        raise WalDecodeError("corrupt lz4 data: truncated") from None
    if len(out) != rawsize:
        raise WalDecodeError(f"corrupt lz4 data: {len(out)} bytes, expected {rawsize}")
    return bytes(out)


def zstd_decompress(src: bytes, rawsize: int) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise WalDecodeError("a page image is zstd-compressed: pip install zstandard") from None
    try:
        return zstandard.ZstdDecompressor().decompress(src, max_output_size=rawsize)
    except zstandard.ZstdError as e:
        raise WalDecodeError(f"corrupt zstd data: {e}") from None
