"""zstd for many layer values at once: batch calls instead of one call per 8 KiB page.

Image layers store each value as its own zstd level-1 frame when that is smaller than the value
(``LayerFileWriter.write_blob``'s rule). Creating or restoring an image handles ~8000 such values
per 64 MiB layer. zstandard's batch calls take many frames per call with the GIL released and
produce the same frames, byte for byte, as one ``compress()`` per value - so the bulk and the
streaming writer write identical files.

Decompression reads each frame's size from its header first, so a whole layer's values can be
laid out before any is decompressed, then decompresses in batches of ~2 MiB of output: one
batch for a whole layer would allocate (and page-fault) a fresh buffer as big as the layer and
copy it once more, which cost as much as decompressing. (A ``stream_reader`` over the frames
decompresses straight into place ~10% faster, but takes the GIL back after every frame: next to
one busy Python thread it took 1.7 s instead of 0.09 s for 117 MB.)

Threads: measured on the 2-core VM (pgbench -s 6 pages, 117 MB, 10 interleaved runs),
``threads=2`` cut the wall time of compressing by 10% (other core busy) to 30% (idle) but used
2-10% more CPU than compressing in the calling thread. Image creation is background work and
the other core is the one Postgres and the WAL receiver need, so no threads.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import zstandard

from neonctl.engine.jit import byte_at, copy_ranges, jit

ZSTD_LEVEL = 1
COMPRESS_THREADS = 0  # in the calling thread (see above)
_DECOMPRESS_BATCH = 2 << 20


class Packed(NamedTuple):
    """Compressed forms of values: value i's frame is ``buf[off[i]:off[i] + length[i]]``; ``length[i] < 0``
    means the frame was not smaller than the value, which is then stored as it is."""

    buf: np.ndarray
    off: np.ndarray
    length: np.ndarray


def _segments(off: np.ndarray, length: np.ndarray) -> bytes:
    return np.column_stack([off, length]).astype(np.uint64).tobytes()


def compress_smaller(src: np.ndarray, off: np.ndarray, length: np.ndarray,
                     threads: int = COMPRESS_THREADS) -> Packed:
    """Compress values ``src[off[i]:off[i] + length[i]]`` one frame each; keep the frames that are smaller."""
    off, length = np.asarray(off, dtype=np.int64), np.asarray(length, dtype=np.int64)
    flen = np.full(len(off), -1, dtype=np.int64)
    foff = np.zeros(len(off), dtype=np.int64)
    some = np.flatnonzero(length > 0)  # a frame is never empty (and the batch call refuses empty values)
    if not len(some):
        return Packed(np.zeros(0, np.uint8), foff, flen)
    values = zstandard.BufferWithSegments(src, _segments(off[some], length[some]))
    frames = zstandard.ZstdCompressor(level=ZSTD_LEVEL).multi_compress_to_buffer(values, threads=threads)
    sizes = np.fromiter(map(len, frames), dtype=np.int64, count=len(some))
    foff[some] = np.cumsum(sizes) - sizes
    flen[some] = np.where(sizes < length[some], sizes, -1)
    return Packed(np.frombuffer(b"".join(frames), dtype=np.uint8), foff, flen)


@jit
def _content_sizes(buf, off, length, sizes):
    """Each zstd frame's content size from its header; returns the index of a frame without one, or -1."""
    for i in range(off.shape[0]):
        o, n = off[i], length[i]
        if n < 6 or byte_at(buf, o) != 0x28 or byte_at(buf, o + 1) != 0xB5 or byte_at(buf, o + 2) != 0x2F \
                or byte_at(buf, o + 3) != 0xFD:
            return i
        fhd = byte_at(buf, o + 4)
        single = (fhd >> 5) & 1
        pos = 5 + (1 - single) + ((1 << (fhd & 3)) >> 1)  # window descriptor, dictionary id (0, 1, 2, 4 bytes)
        fcs = (1 << (fhd >> 6)) if fhd >> 6 else single  # content size field: 0/1, 2, 4, 8 bytes
        if fcs == 0 or pos + fcs > n:
            return i
        v = np.int64(0)
        for k in range(fcs):
            v |= byte_at(buf, o + pos + k) << (8 * k)
        sizes[i] = v + 256 if fcs == 2 else v
    return -1


def frame_sizes(region: np.ndarray, off: np.ndarray, length: np.ndarray) -> np.ndarray:
    """What the frames ``region[off[i]:off[i] + length[i]]`` decompress to, from their headers.

    Raises ValueError for a frame whose header lacks the size (our writers always record it).
    """
    sizes = np.empty(len(off), dtype=np.int64)
    bad = _content_sizes(region, np.asarray(off, np.int64), np.asarray(length, np.int64), sizes)
    if bad >= 0:
        raise ValueError(f"value {bad} is not a zstd frame with its content size")
    return sizes


def decompress_into(region: np.ndarray, off: np.ndarray, length: np.ndarray, sizes: np.ndarray, dest: np.ndarray,
                    dest_off: np.ndarray) -> None:
    """Decompress frame i (``region[off[i]:off[i] + length[i]]``, ``sizes[i]`` bytes) to ``dest[dest_off[i]:]``.

    Frames go to zstd in batches of ~2 MiB of output: one call each with the GIL released, and
    the batch's output is still in cache when it is copied into place. Raises
    ``zstandard.ZstdError`` or ValueError for a frame that does not decompress to its size.
    """
    segments = np.column_stack([off, length]).astype(np.uint64)
    ends = np.cumsum(sizes)
    dctx = zstandard.ZstdDecompressor()
    a = 0
    while a < len(off):
        b = max(a + 1, int(np.searchsorted(ends, ends[a] - sizes[a] + _DECOMPRESS_BATCH, side="right")))
        frames = zstandard.BufferWithSegments(region, segments[a:b].tobytes())
        out = np.frombuffer(b"".join(dctx.multi_decompress_to_buffer(frames)), dtype=np.uint8)
        if len(out) != int(ends[b - 1] - ends[a] + sizes[a]):
            raise ValueError(f"values {a}..{b - 1} decompress to {len(out)} bytes, their headers say otherwise")
        copy_ranges(out, ends[a:b] - sizes[a:b] - (ends[a] - sizes[a]), sizes[a:b], dest, dest_off[a:b])
        a = b
