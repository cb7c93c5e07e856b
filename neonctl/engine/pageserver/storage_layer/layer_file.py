"""Layer file framing shared by delta and image layers: summary, blobs, index blocks, checksums.

A layer file is immutable once written and is laid out in 8 KiB blocks::

    block 0              summary (written last): what the file holds and where its index is
    byte 8192 ...        value region: blobs appended one after another
    next 8 KiB boundary  index: B-tree nodes (disk_btree), root last - so the file ends at the root

A blob is a length header, the payload and a crc32c. The header is 1 byte when the payload is
shorter than 128 bytes and not compressed (most WAL records), else 4 bytes big-endian with the top
bit set, 3 compression bits (0 = none, 1 = zstd) and a 28-bit length. The trailing crc32c covers
header and payload. The summary block ends with a crc32c of the block, and every index node
carries its own. Together with the file-size check on open (the file must end exactly at the
index root), a truncated or bit-flipped layer raises ``CorruptData`` naming the file instead of
returning wrong pages. The checksums are neonctl's addition to Neon's format, which has none.

Files are written to ``<name>.tmp``, fsynced, renamed into place and the directory fsynced, so a
crash never leaves a half-written layer under its real name.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import crc32c
import numpy as np
import zstandard

from neonctl.engine.durability import fsync_dir
from neonctl.engine.jit import (
    CRC_TABLE,
    byte_at,
    copy_and_crc,
    copy_ranges,
    crc32c_range,
    crc32c_update,
    jit,
)
from neonctl.engine.pageserver.key import KEY_SIZE, Key, KeyRange
from neonctl.engine.pageserver.storage_layer.blob_zstd import (
    ZSTD_LEVEL,
    Packed,
    decompress_into,
    frame_sizes,
)
from neonctl.engine.pageserver.storage_layer.disk_btree import (
    NODE_SIZE,
    BTreeBuilder,
    BTreeReader,
    build_sorted,
    read_all_leaves,
)
from neonctl.engine.scratch import scratch
from neonctl.errors import CorruptData

BLOCK_SIZE = 8192
assert NODE_SIZE == BLOCK_SIZE
FORMAT_VERSION = 1
DELTA_MAGIC = 0x5A61
IMAGE_MAGIC = 0x5A60

_LONG_FLAG = 0x8000_0000
_COMPRESSION_SHIFT = 28
_COMPRESSION_MASK = 0x7
_LENGTH_MASK = (1 << _COMPRESSION_SHIFT) - 1
MAX_BLOB_SIZE = _LENGTH_MASK
COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
_FIRST_READ = 512  # bytes fetched for a blob before its length is known
_MAX_SPAN = 1 << 20  # read_blobs reads a span this long at once, else blob by blob
_SPOOL_MEMORY = 8 << 20  # index bytes kept in memory while writing before spilling to disk

_SUMMARY = struct.Struct(f">HH16s{KEY_SIZE}s{KEY_SIZE}sQQII")
_CRC = struct.Struct(">I")
_CRC_OFFSET = BLOCK_SIZE - _CRC.size


def normalize_timeline_id(timeline_id: str | bytes) -> str:
    """Timeline ids are 16 bytes, written as 32 lower-case hex characters."""
    raw = bytes.fromhex(timeline_id) if isinstance(timeline_id, str) else bytes(timeline_id)
    if len(raw) != 16:
        raise ValueError(f"timeline id must be 16 bytes / 32 hex characters, got {timeline_id!r}")
    return raw.hex()


@dataclass(frozen=True)
class LayerSummary:
    """Contents of block 0. Image layers have one LSN: ``lsn_end == lsn_start + 1``."""

    magic: int
    format_version: int
    timeline_id: str
    key_range: KeyRange
    lsn_start: int
    lsn_end: int
    index_start_blk: int
    index_root_blk: int

    def to_block(self) -> bytes:
        block = bytearray(BLOCK_SIZE)
        _SUMMARY.pack_into(
            block,
            0,
            self.magic,
            self.format_version,
            bytes.fromhex(self.timeline_id),
            self.key_range.start.to_bytes(),
            self.key_range.end.to_bytes(),
            self.lsn_start,
            self.lsn_end,
            self.index_start_blk,
            self.index_root_blk,
        )
        _CRC.pack_into(block, _CRC_OFFSET, crc32c.crc32c(memoryview(block)[:_CRC_OFFSET]))
        return bytes(block)

    @classmethod
    def from_block(cls, block: bytes, path: str) -> LayerSummary:
        if len(block) != BLOCK_SIZE:
            raise CorruptData(f"{path}: summary block truncated ({len(block)} bytes)")
        (stored,) = _CRC.unpack_from(block, _CRC_OFFSET)
        if stored != crc32c.crc32c(memoryview(block)[:_CRC_OFFSET]):
            raise CorruptData(f"{path}: summary checksum mismatch")
        magic, version, tl, kstart, kend, lsn_start, lsn_end, istart, iroot = _SUMMARY.unpack_from(block)
        if version != FORMAT_VERSION:
            raise CorruptData(f"{path}: unsupported layer format version {version}")
        key_range = KeyRange(Key.from_bytes(kstart), Key.from_bytes(kend))
        return cls(magic, version, tl.hex(), key_range, lsn_start, lsn_end, istart, iroot)


def encode_blob_header(length: int, compression: int) -> bytes:
    if length < 0x80 and compression == COMPRESSION_NONE:
        return bytes((length,))
    if length > MAX_BLOB_SIZE:
        raise ValueError(f"blob of {length} bytes exceeds the {MAX_BLOB_SIZE}-byte limit")
    return (_LONG_FLAG | compression << _COMPRESSION_SHIFT | length).to_bytes(4, "big")


@jit
def _put_u32_be(out, pos, v):
    p = np.uint64(pos)
    out[p] = (v >> 24) & 0xFF
    out[p + np.uint64(1)] = (v >> 16) & 0xFF
    out[p + np.uint64(2)] = (v >> 8) & 0xFF
    out[p + np.uint64(3)] = v & 0xFF


@jit
def _encode_blobs(src, off, length, tag, zbuf, zoff, zlen, out, table, offsets):
    """Frame values ``[tag byte] + src[off:off+length]`` as blobs into ``out``; returns bytes used.

    ``tag[i] < 0`` means no tag byte. Where ``zlen[i] >= 0`` (if ``zlen`` is not empty) the value
    is stored compressed instead: the zstd frame ``zbuf[zoff:zoff+zlen]``, no tag. ``offsets[i]``
    receives the blob's offset in ``out``. The payload is copied and checksummed in the same pass,
    eight bytes at a time.
    """
    pos = np.int64(0)
    any_packed = zlen.shape[0] != 0
    for i in range(off.shape[0]):
        t = tag[i]
        n = length[i]
        packed = any_packed and zlen[i] >= 0
        if packed:
            t = -1
            n = zlen[i]
        plen = n + (1 if t >= 0 else 0)
        offsets[i] = pos
        start = pos
        if packed:
            _put_u32_be(out, pos, 0x80000000 | (COMPRESSION_ZSTD << 28) | plen)
            pos += 4
        elif plen < 0x80:
            out[np.uint64(pos)] = plen
            pos += 1
        else:
            _put_u32_be(out, pos, 0x80000000 | plen)
            pos += 4
        if t >= 0:
            out[np.uint64(pos)] = t
            pos += 1
        state = crc32c_update(table, out, start, pos, np.int64(0xFFFFFFFF))
        if packed:
            state = copy_and_crc(zbuf, zoff[i], out, pos, n, state, table)
        else:
            state = copy_and_crc(src, off[i], out, pos, n, state, table)
        pos += n
        _put_u32_be(out, pos, state ^ 0xFFFFFFFF)
        pos += 4
    return pos


@jit
def _decode_blobs(region, offsets, payload_off, payload_len, compression, table):
    """Locate and checksum the blobs at ``offsets`` in ``region``; returns the index of a bad one or -1."""
    n = region.shape[0]
    for i in range(offsets.shape[0]):
        o = offsets[i]
        if o < 0 or o >= n:
            return i
        first = byte_at(region, o)
        if first < 0x80:
            hlen = 1
            plen = first
            comp = 0
        else:
            if o + 4 > n:
                return i
            word = (first << 24) | (byte_at(region, o + 1) << 16) | (byte_at(region, o + 2) << 8) | \
                byte_at(region, o + 3)
            hlen = 4
            plen = word & 0x0FFFFFFF
            comp = (word >> 28) & 0x7
        end = o + hlen + plen
        if end + 4 > n:
            return i
        stored = (byte_at(region, end) << 24) | (byte_at(region, end + 1) << 16) | \
            (byte_at(region, end + 2) << 8) | byte_at(region, end + 3)
        if crc32c_range(region, o, end, table) != stored:
            return i
        payload_off[i] = o + hlen
        payload_len[i] = plen
        compression[i] = comp
    return -1


def frame_blobs(src: np.ndarray, off: np.ndarray, length: np.ndarray, tag: np.ndarray,
                packed: Packed | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Many values framed as blobs in one go: (region bytes, offset of each blob in it).

    With ``packed`` (``blob_zstd.compress_smaller``'s output), values it has a frame for are stored
    compressed. The region is a scratch buffer: write it out before this thread frames the next layer.
    """
    n = len(off)
    off = np.ascontiguousarray(off, dtype=np.int64)
    length = np.ascontiguousarray(length, dtype=np.int64)
    if n and int(length.max()) + 1 > MAX_BLOB_SIZE:
        raise ValueError(f"blob of {int(length.max())} bytes exceeds the {MAX_BLOB_SIZE}-byte limit")
    if packed is None:
        packed = Packed(np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64))
        stored = int(length.sum())
    else:
        stored = int(np.where(packed.length >= 0, packed.length, length).sum())
    out = scratch("blob-region", stored + 9 * n)  # written out before the next layer
    offsets = np.empty(n, dtype=np.int64)
    used = _encode_blobs(src, off, length, np.ascontiguousarray(tag, dtype=np.int16), packed.buf,
                         np.ascontiguousarray(packed.off, dtype=np.int64),
                         np.ascontiguousarray(packed.length, dtype=np.int64), out, CRC_TABLE, offsets)
    return out[:used], offsets


def write_layer_file(path: str | os.PathLike[str], magic: int, timeline_id: str, key_range: KeyRange,
                     lsn_start: int, lsn_end: int, region: np.ndarray, index_keys: np.ndarray,
                     index_values: np.ndarray) -> tuple[LayerSummary, int]:
    """Write a whole layer file from arrays (bulk ``LayerFileWriter``): value region, index, summary.

    Same file layout and durability steps as the streaming writer: a ``.tmp``
    file, fsynced, renamed, directory fsynced. Returns (summary, file size).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    timeline_id = normalize_timeline_id(timeline_id)
    values_end = BLOCK_SIZE + len(region)
    start_blk = -(-values_end // BLOCK_SIZE)
    index, root, n_blocks = build_sorted(index_keys, index_values)
    summary = LayerSummary(magic, FORMAT_VERSION, timeline_id, key_range, lsn_start, lsn_end, start_blk,
                           start_blk + root)
    try:
        with open(tmp, "wb") as f:
            f.write(summary.to_block())
            f.write(memoryview(region))
            f.write(bytes(start_blk * BLOCK_SIZE - values_end))
            f.write(index)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return summary, (start_blk + n_blocks) * BLOCK_SIZE


class LayerFileWriter:
    """Appends blobs and their index entries; ``finish`` adds the index and the summary.

    The index is built while values are appended, but can only go after the last value, so its
    blocks are spooled aside (in memory, spilling to a temporary file) and copied at the end.
    Block numbers inside the index are relative to its first block. Use as a context manager (or
    call ``abort``) so a failed write leaves no ``.tmp`` file behind.
    """

    def __init__(self, path: str | os.PathLike[str], key_len: int):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self._spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY, dir=self.path.parent)  # noqa: SIM115
        self._file = open(self.tmp_path, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in finish/abort
        self._file.write(bytes(BLOCK_SIZE))  # summary placeholder
        self.offset = BLOCK_SIZE
        self.index = BTreeBuilder(key_len, self._spool.write)
        self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self._done = False

    def write_blob(self, data: bytes, compress: bool = False) -> int:
        """Append one value; returns its file offset. ``compress`` stores zstd only if it is smaller."""
        compression = COMPRESSION_NONE
        if compress:
            packed = self._zstd.compress(data)
            if len(packed) < len(data):
                data, compression = packed, COMPRESSION_ZSTD
        header = encode_blob_header(len(data), compression)
        crc = crc32c.crc32c(data, crc32c.crc32c(header))
        offset = self.offset
        self._file.write(header)
        self._file.write(data)
        self._file.write(_CRC.pack(crc))
        self.offset += len(header) + len(data) + _CRC.size
        return offset

    def finish(self, magic: int, timeline_id: str, key_range: KeyRange, lsn_start: int, lsn_end: int) -> LayerSummary:
        """Write index and summary, make the file durable and move it to its final name."""
        if self._done:
            raise ValueError(f"{self.path}: layer writer already finished")
        try:
            return self._finish(magic, timeline_id, key_range, lsn_start, lsn_end)
        except BaseException:
            self.abort()
            raise

    def _finish(self, magic: int, timeline_id: str, key_range: KeyRange, lsn_start: int, lsn_end: int) -> LayerSummary:
        self._done = True
        timeline_id = normalize_timeline_id(timeline_id)
        root, n_blocks = self.index.finish()
        self._file.write(bytes(-self.offset % BLOCK_SIZE))
        start_blk = -(-self.offset // BLOCK_SIZE)
        self._spool.seek(0)
        shutil.copyfileobj(self._spool, self._file)
        self._spool.close()
        self.offset = (start_blk + n_blocks) * BLOCK_SIZE
        summary = LayerSummary(
            magic, FORMAT_VERSION, timeline_id, key_range, lsn_start, lsn_end, start_blk, start_blk + root
        )
        self._file.seek(0)
        self._file.write(summary.to_block())
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.path)
        fsync_dir(self.path.parent)
        return summary

    def abort(self) -> None:
        self._done = True
        self._spool.close()
        if not self._file.closed:
            self._file.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> LayerFileWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self._done or exc_type is not None:
            self.abort()


_decompressors = threading.local()


def _zstd_decompress(data: bytes, limit: int) -> bytes:
    dctx = getattr(_decompressors, "dctx", None)
    if dctx is None:
        dctx = _decompressors.dctx = zstandard.ZstdDecompressor()
    return dctx.decompress(data, max_output_size=limit)


class LayerFileReader:
    """Validated random access to one layer file: summary, blobs and index blocks.

    Uses ``os.pread`` on one descriptor, so a reader can be shared by threads.
    """

    def __init__(self, path: str | os.PathLike[str], magic: int, kind: str, key_len: int):
        self.path = str(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.file_size = os.fstat(self._fd).st_size
            self.summary = LayerSummary.from_block(os.pread(self._fd, BLOCK_SIZE, 0), self.path)
            s = self.summary
            if s.magic != magic:
                raise CorruptData(
                    f"{self.path}: wrong layer kind: magic {s.magic:#06x}, {kind} layers have {magic:#06x}"
                )
            if not 1 <= s.index_start_blk <= s.index_root_blk:
                raise CorruptData(f"{self.path}: bad index location {s.index_start_blk}..{s.index_root_blk}")
            expected = (s.index_root_blk + 1) * BLOCK_SIZE
            if self.file_size != expected:
                raise CorruptData(f"{self.path}: file is {self.file_size} bytes, summary says {expected}")
        except BaseException:
            os.close(self._fd)
            raise
        self._values_end = s.index_start_blk * BLOCK_SIZE
        self.index = BTreeReader(self._read_index_block, s.index_root_blk - s.index_start_blk, key_len, name=self.path)

    def _read_index_block(self, rel_blk: int) -> bytes:
        blk = self.summary.index_start_blk + rel_blk
        if not self.summary.index_start_blk <= blk <= self.summary.index_root_blk:
            raise CorruptData(f"{self.path}: index points at block {blk}, outside the index")
        data = os.pread(self._fd, BLOCK_SIZE, blk * BLOCK_SIZE)
        if len(data) != BLOCK_SIZE:
            raise CorruptData(f"{self.path}: block {blk} truncated")
        return data

    def read_blob(self, offset: int) -> bytes:
        self._check_offset(offset)
        return self._decode_blob(os.pread(self._fd, min(_FIRST_READ, self._values_end - offset), offset), 0, offset)

    def read_blobs(self, offsets: list[int]) -> list[bytes]:
        """Several blobs that lie close together (one key's versions do) with a single read."""
        if not offsets:
            return []
        lo, hi = min(offsets), max(offsets)
        if hi - lo > _MAX_SPAN:
            return [self.read_blob(offset) for offset in offsets]
        self._check_offset(lo)
        self._check_offset(hi)
        buf = os.pread(self._fd, min(hi + _FIRST_READ, self._values_end) - lo, lo)
        return [self._decode_blob(buf, offset - lo, offset) for offset in offsets]

    def _check_offset(self, offset: int) -> None:
        if not BLOCK_SIZE <= offset < self._values_end:
            raise CorruptData(f"{self.path}: blob offset {offset} outside the value region")

    def _decode_blob(self, buf: bytes, pos: int, offset: int) -> bytes:
        """The blob at file ``offset``, found at ``buf[pos:]``; re-reads if ``buf`` holds only part of it."""
        if pos >= len(buf):
            raise CorruptData(f"{self.path}: blob at {offset} truncated")
        first = buf[pos]
        if first < 0x80:
            hlen, length, compression = 1, first, COMPRESSION_NONE
        else:
            word = int.from_bytes(buf[pos : pos + 4], "big")
            hlen, length = 4, word & _LENGTH_MASK
            compression = (word >> _COMPRESSION_SHIFT) & _COMPRESSION_MASK
        total = hlen + length + _CRC.size
        if offset + total > self._values_end:
            raise CorruptData(f"{self.path}: blob at {offset} runs past the value region")
        if pos + total > len(buf):
            buf, pos = os.pread(self._fd, total, offset), 0  # one read of the whole blob
            if len(buf) < total:
                raise CorruptData(f"{self.path}: blob at {offset} truncated")
        view = memoryview(buf)[pos : pos + total]
        (stored,) = _CRC.unpack_from(view, hlen + length)
        if stored != crc32c.crc32c(view[: hlen + length]):
            raise CorruptData(f"{self.path}: checksum mismatch in blob at offset {offset}")
        payload = bytes(view[hlen : hlen + length])
        if compression == COMPRESSION_NONE:
            return payload
        if compression == COMPRESSION_ZSTD:
            try:
                return _zstd_decompress(payload, MAX_BLOB_SIZE)
            except zstandard.ZstdError as e:
                raise CorruptData(f"{self.path}: blob at offset {offset} does not decompress: {e}") from e
        raise CorruptData(f"{self.path}: blob at offset {offset} has unknown compression {compression}")

    def index_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (key, index value) of the layer in key order, from one read of the index: no blob is read."""
        s = self.summary
        index = os.pread(self._fd, (s.index_root_blk + 1 - s.index_start_blk) * BLOCK_SIZE,
                         s.index_start_blk * BLOCK_SIZE)
        return read_all_leaves(index, self.index.key_len, name=self.path)

    def read_all(self, flag_bits: int = 0, contiguous: bool = False, scratch_name: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
        """Every index entry and where its blob's payload lies, checksums verified, in two reads.

        An index value is a blob offset shifted left by ``flag_bits``. Returns (keys, index values,
        values, payload offsets, payload lengths). Values are the value region, or - when some blobs
        are compressed - (region, their decompressed payloads), offsets addressing the two as if
        concatenated. With ``contiguous`` values are instead copied back to back in index order into
        one buffer: this thread's scratch buffer ``scratch_name`` (valid until its next use) if given.
        """
        s = self.summary
        index = os.pread(self._fd, (s.index_root_blk + 1 - s.index_start_blk) * BLOCK_SIZE,
                         s.index_start_blk * BLOCK_SIZE)
        keys, index_values = read_all_leaves(index, self.index.key_len, name=self.path)
        region = np.frombuffer(os.pread(self._fd, self._values_end - BLOCK_SIZE, BLOCK_SIZE), dtype=np.uint8)
        offsets = (index_values >> np.uint64(flag_bits)).astype(np.int64) - BLOCK_SIZE
        n = len(offsets)
        poff, plen, comp = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
        bad = _decode_blobs(region, offsets, poff, plen, comp, CRC_TABLE)
        if bad >= 0:
            raise CorruptData(f"{self.path}: checksum mismatch or bad header in blob at offset "
                              f"{int(offsets[bad]) + BLOCK_SIZE}")
        packed = np.flatnonzero(comp)
        sizes = self._unpacked_sizes(region, offsets, poff, plen, comp, packed)
        length = plen.copy()
        length[packed] = sizes
        if contiguous:
            size = int(length.sum())
            out = scratch(scratch_name, size) if scratch_name else np.empty(size, dtype=np.uint8)
            out_off = np.cumsum(length) - length
            raw = np.flatnonzero(comp == COMPRESSION_NONE)
            copy_ranges(region, poff[raw], plen[raw], out, out_off[raw])
            self._decompress(region, poff[packed], plen[packed], sizes, out, out_off[packed])
            return keys, index_values, out, out_off, length
        if not len(packed):
            return keys, index_values, region, poff, plen
        unpacked = np.empty(int(sizes.sum()), dtype=np.uint8)
        unpacked_off = np.cumsum(sizes) - sizes
        self._decompress(region, poff[packed], plen[packed], sizes, unpacked, unpacked_off)
        poff[packed] = len(region) + unpacked_off
        return keys, index_values, (region, unpacked), poff, length

    def _unpacked_sizes(self, region: np.ndarray, offsets: np.ndarray, poff: np.ndarray, plen: np.ndarray,
                        comp: np.ndarray, packed: np.ndarray) -> np.ndarray:
        """What the compressed blobs (rows ``packed``) decompress to, from their frame headers."""
        unknown = packed[comp[packed] != COMPRESSION_ZSTD]
        if len(unknown):
            i = int(unknown[0])
            raise CorruptData(f"{self.path}: blob at offset {int(offsets[i]) + BLOCK_SIZE} has unknown"
                              f" compression {int(comp[i])}")
        try:
            sizes = frame_sizes(region, poff[packed], plen[packed])
        except ValueError as e:
            raise CorruptData(f"{self.path}: a compressed blob does not decompress: {e}") from e
        if len(sizes) and (int(sizes.min()) < 0 or int(sizes.max()) > MAX_BLOB_SIZE):
            raise CorruptData(f"{self.path}: a compressed blob claims to hold more than {MAX_BLOB_SIZE} bytes")
        return sizes

    def _decompress(self, region: np.ndarray, off: np.ndarray, length: np.ndarray, sizes: np.ndarray,
                    dest: np.ndarray, dest_off: np.ndarray) -> None:
        try:
            decompress_into(region, off, length, sizes, dest, dest_off)
        except (zstandard.ZstdError, ValueError) as e:
            raise CorruptData(f"{self.path}: a compressed blob does not decompress: {e}") from e

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> LayerFileReader:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
