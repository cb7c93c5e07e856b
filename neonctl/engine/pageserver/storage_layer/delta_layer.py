"""Delta layers: every change to a key range within an LSN range, for page reconstruction.

A delta layer is what the pageserver writes when it freezes ingested WAL (an L0 over the whole key
space) or when compaction re-sorts L0s into narrower L1s. It holds, for each key, the values
(WAL records or page images, opaque bytes here) with their LSNs, sorted by (key, LSN).

To read a page at LSN L, the pageserver walks a key's versions newest-first below L and stops at
the first one that initialises the page on its own (a full page image, or a record with
``will_init``); older versions are not needed. So the index stores ``will_init`` next to the
value's offset - ``offset << 1 | will_init`` under the 26-byte B-tree key ``key || lsn (u64 BE)`` -
and a lookup knows where to stop from the index alone, reading only the blobs it will use.
Values are stored uncompressed: WAL records are small and compress poorly one by one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from neonctl.engine.lsn import format_lsn
from neonctl.engine.pageserver.key import KEY_SIZE, Key, KeyRange
from neonctl.engine.pageserver.storage_layer.layer_file import (
    BLOCK_SIZE,
    DELTA_MAGIC,
    LayerFileReader,
    LayerFileWriter,
    LayerSummary,
    frame_blobs,
    normalize_timeline_id,
    write_layer_file,
)
from neonctl.engine.pageserver.storage_layer.layer_name import DeltaLayerName
from neonctl.engine.scratch import scratch
from neonctl.errors import CorruptData

DELTA_KEY_LEN = KEY_SIZE + 8
_MAX_LSN = (1 << 64) - 1


def _index_key(key: Key, lsn: int) -> bytes:
    return key.to_bytes() + lsn.to_bytes(8, "big")


@dataclass(frozen=True)
class DeltaLayerInfo:
    """What a finished writer produced."""

    path: Path
    name: DeltaLayerName
    timeline_id: str
    file_size: int
    num_values: int

    @property
    def key_range(self) -> KeyRange:
        return self.name.key_range

    @property
    def lsn_start(self) -> int:
        return self.name.lsn_start

    @property
    def lsn_end(self) -> int:
        return self.name.lsn_end


@dataclass
class DeltaEntries:
    """Many delta values as columns: what bulk writers take and ``read_all`` returns.

    Row i is index key ``ikeys[i]`` (the 18-byte key then the LSN, big-endian),
    ``will_init[i]``, and the value ``[tag[i]] + src[off[i]:off[i] + length[i]]``
    (no tag byte where ``tag[i] < 0``). ``src`` may be a tuple of buffers that
    offsets address as if they were concatenated: ingest keeps a WAL batch's
    records and its gathered page images apart without copying either.
    """

    ikeys: np.ndarray  # (n, DELTA_KEY_LEN) uint8
    will_init: np.ndarray  # bool
    src: np.ndarray | tuple[np.ndarray, ...]  # uint8
    off: np.ndarray  # int64
    length: np.ndarray  # int64
    tag: np.ndarray  # int16

    def __len__(self) -> int:
        return len(self.off)

    def lsns(self) -> np.ndarray:
        return self.ikeys[:, KEY_SIZE:].copy().view(">u8").ravel().astype(np.uint64)

    def parts(self) -> tuple[np.ndarray, ...]:
        return self.src if isinstance(self.src, tuple) else (self.src,)

    def value(self, i: int) -> bytes:
        off, n = int(self.off[i]), int(self.length[i])
        for part in self.parts():
            if off < len(part):
                break
            off -= len(part)
        body = part[off:off + n].tobytes()
        return body if self.tag[i] < 0 else bytes((int(self.tag[i]),)) + body

    def take(self, rows: np.ndarray | slice) -> DeltaEntries:
        if isinstance(rows, slice):
            return DeltaEntries(self.ikeys[rows], self.will_init[rows], self.src, self.off[rows], self.length[rows],
                                self.tag[rows])
        if rows.dtype == np.bool_:
            rows = np.flatnonzero(rows)
        return DeltaEntries(np.take(self.ikeys, rows, axis=0), np.take(self.will_init, rows), self.src,
                            np.take(self.off, rows), np.take(self.length, rows), np.take(self.tag, rows))

    def value_bytes(self) -> int:
        return int(self.length.sum()) + len(self)


def joined_sources(parts: list[np.ndarray] | tuple[np.ndarray, ...], name: str) -> np.ndarray:
    """The buffers back to back in a scratch buffer (valid until this thread's next join of that name)."""
    out = scratch(name, sum(len(p) for p in parts))
    at = 0
    for p in parts:
        out[at:at + len(p)] = p
        at += len(p)
    return out


def write_delta_layer(path: str | os.PathLike[str], timeline_id: str, entries: DeltaEntries, key_start: Key,
                      key_end: Key, lsn_start: int, lsn_end: int) -> DeltaLayerInfo:
    """Write a delta layer from entries already sorted by (key, LSN) - the bulk ``DeltaLayerWriter``."""
    n = len(entries)
    if n:
        first, last = Key.from_bytes(entries.ikeys[0, :KEY_SIZE].tobytes()), \
            Key.from_bytes(entries.ikeys[-1, :KEY_SIZE].tobytes())
        if first < key_start or not last < key_end:
            raise ValueError(f"keys {first}..{last} outside the layer's range {key_start}-{key_end}")
        lsns = entries.lsns()
        if int(lsns.min()) < lsn_start or int(lsns.max()) >= lsn_end:
            raise ValueError(f"LSNs {format_lsn(int(lsns.min()))}..{format_lsn(int(lsns.max()))} outside the layer"
                             f" {format_lsn(lsn_start)}..{format_lsn(lsn_end)}")
    src = entries.src if not isinstance(entries.src, tuple) else joined_sources(entries.parts(), "join")
    region, offsets = frame_blobs(src, entries.off, entries.length, entries.tag)
    packed = ((offsets + BLOCK_SIZE).astype(np.uint64) << np.uint64(1)) | entries.will_init.astype(np.uint64)
    name = DeltaLayerName(KeyRange(key_start, key_end), lsn_start, lsn_end)
    summary, size = write_layer_file(path, DELTA_MAGIC, timeline_id, name.key_range, lsn_start, lsn_end, region,
                                     entries.ikeys, packed)
    return DeltaLayerInfo(Path(path), name, summary.timeline_id, size, n)


class DeltaLayerWriter:
    """Writes one delta layer; ``put`` in (key, lsn) order, then ``finish``.

    Use as a context manager: leaving the block without ``finish`` (or on an exception) removes the
    temporary file.
    """

    def __init__(self, path: str | os.PathLike[str], timeline_id: str | bytes, key_start: Key, lsn_start: int):
        if not 0 <= lsn_start < _MAX_LSN:
            raise ValueError(f"bad start LSN {lsn_start:#x}")
        self.timeline_id = normalize_timeline_id(timeline_id)
        self.key_start = key_start
        self.lsn_start = lsn_start
        self._file = LayerFileWriter(path, DELTA_KEY_LEN)
        self._last: bytes | None = None
        self._last_key = key_start
        self._max_lsn = lsn_start
        self.num_values = 0

    def put(self, key: Key, lsn: int, value: bytes, will_init: bool) -> None:
        if key < self.key_start:
            raise ValueError(f"key {key} below the layer's start key {self.key_start}")
        if not self.lsn_start <= lsn < _MAX_LSN:
            raise ValueError(f"LSN {format_lsn(lsn)} outside the layer (starts at {format_lsn(self.lsn_start)})")
        ikey = _index_key(key, lsn)
        if self._last is not None and ikey <= self._last:
            raise ValueError(f"put({key}, {format_lsn(lsn)}) is not after the previous (key, lsn)")
        offset = self._file.write_blob(value)
        self._file.index.append(ikey, offset << 1 | bool(will_init))
        self._last = ikey
        self._last_key = key
        if lsn > self._max_lsn:
            self._max_lsn = lsn
        self.num_values += 1

    def finish(self, key_end: Key, lsn_end: int) -> DeltaLayerInfo:
        """Seal the layer as covering [key_start, key_end) x [lsn_start, lsn_end)."""
        if self.num_values and not self._last_key < key_end:
            raise ValueError(f"key end {key_end} does not cover the last key {self._last_key}")
        if self.num_values and not self._max_lsn < lsn_end:
            raise ValueError(f"LSN end {format_lsn(lsn_end)} does not cover {format_lsn(self._max_lsn)}")
        name = DeltaLayerName(KeyRange(self.key_start, key_end), self.lsn_start, lsn_end)
        summary = self._file.finish(DELTA_MAGIC, self.timeline_id, name.key_range, self.lsn_start, lsn_end)
        return DeltaLayerInfo(self._file.path, name, summary.timeline_id, self._file.offset, self.num_values)

    def abort(self) -> None:
        self._file.abort()

    def __enter__(self) -> DeltaLayerWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._file.__exit__(exc_type, exc, tb)


class DeltaLayerReader:
    """Random and sequential reads of one delta layer; corruption raises ``CorruptData``."""

    def __init__(self, path: str | os.PathLike[str]):
        self._file = LayerFileReader(path, DELTA_MAGIC, "delta", DELTA_KEY_LEN)
        self.path = self._file.path
        self.summary: LayerSummary = self._file.summary
        try:
            self.name = DeltaLayerName(self.summary.key_range, self.summary.lsn_start, self.summary.lsn_end)
        except ValueError as e:
            self._file.close()
            raise CorruptData(f"{self.path}: bad summary: {e}") from e

    @property
    def key_range(self) -> KeyRange:
        return self.summary.key_range

    @property
    def lsn_start(self) -> int:
        return self.summary.lsn_start

    @property
    def lsn_end(self) -> int:
        return self.summary.lsn_end

    def get_values(self, key: Key, lsn_end: int) -> list[tuple[int, bool, bytes]]:
        """Versions of ``key`` below ``lsn_end``, newest first, up to and including the first will_init."""
        if lsn_end <= self.lsn_start or not self.key_range.contains(key):
            return []
        kbytes = key.to_bytes()
        found: list[tuple[int, int]] = []
        newest = _index_key(key, min(lsn_end, _MAX_LSN + 1) - 1)
        for ikey, packed in self._file.index.iter_from(newest, forward=False):
            if ikey[:KEY_SIZE] != kbytes:
                break
            found.append((int.from_bytes(ikey[KEY_SIZE:], "big"), packed))
            if packed & 1:
                break
        blobs = self._file.read_blobs([packed >> 1 for _, packed in found])
        return [(lsn, bool(packed & 1), blob) for (lsn, packed), blob in zip(found, blobs, strict=True)]

    def iter_index(self) -> Iterator[tuple[Key, int, bool]]:
        """(key, lsn, will_init) in (key, lsn) order, without reading values."""
        for ikey, packed in self._file.index.iter_all():
            yield Key.from_bytes(ikey[:KEY_SIZE]), int.from_bytes(ikey[KEY_SIZE:], "big"), bool(packed & 1)

    def iter_all(self) -> Iterator[tuple[Key, int, bool, bytes]]:
        """(key, lsn, will_init, value) in (key, lsn) order."""
        for ikey, packed in self._file.index.iter_all():
            key = Key.from_bytes(ikey[:KEY_SIZE])
            yield key, int.from_bytes(ikey[KEY_SIZE:], "big"), bool(packed & 1), self._file.read_blob(packed >> 1)

    def read_all(self) -> DeltaEntries:
        """Every value of the layer as columns, in (key, LSN) order, checksums verified."""
        ikeys, packed, region, poff, plen = self._file.read_all(flag_bits=1)
        return DeltaEntries(ikeys, (packed & np.uint64(1)).astype(bool), region, poff, plen,
                            np.full(len(poff), -1, dtype=np.int16))

    def index_keys(self) -> np.ndarray:
        """The index's (key || LSN) rows, (n, 26) uint8 in (key, LSN) order, from one read: no value is read."""
        return self.index_rows()[0]

    def index_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(the index's (key || LSN) rows as above, each value's will_init), from one read of the index."""
        ikeys, packed = self._file.index_entries()
        return ikeys, (packed & np.uint64(1)).astype(bool)

    def keys(self) -> Iterator[Key]:
        """Distinct keys with at least one value, ascending."""
        last = None
        for ikey, _ in self._file.index.iter_all():
            head = ikey[:KEY_SIZE]
            if head != last:
                last = head
                yield Key.from_bytes(head)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> DeltaLayerReader:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
