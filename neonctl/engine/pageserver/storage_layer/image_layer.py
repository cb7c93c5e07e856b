"""Image layers: a complete snapshot of a key range at one LSN.

Reconstructing a page from a long chain of deltas is slow, so the pageserver periodically
materialises every key of a range at an LSN into an image layer. A read at or above that LSN
stops there: the value in the image is the page as of the layer's LSN. An image layer is also
authoritative about absence - a key inside its range that is not in the file did not exist at
that LSN, so the search must not continue into older layers or the ancestor timeline.

Values are whole 8 KiB pages (or other serialized values such as a relation size), compressed
with zstd level 1 when that makes them smaller, indexed by the 18-byte key.

Images are created and restored a whole layer at a time, so besides the per-key writer and
reader there are bulk forms that take and return columns (``write_image_layer``,
``ImageLayerReader.read_all``): one zstd batch call, one framing kernel and one B-tree build per
layer instead of Python calls per page. Both writers produce the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from neonctl.engine.pageserver.key import KEY_SIZE, Key, KeyRange
from neonctl.engine.pageserver.storage_layer.blob_zstd import compress_smaller
from neonctl.engine.pageserver.storage_layer.layer_file import (
    BLOCK_SIZE,
    IMAGE_MAGIC,
    LayerFileReader,
    LayerFileWriter,
    LayerSummary,
    frame_blobs,
    normalize_timeline_id,
    write_layer_file,
)
from neonctl.engine.pageserver.storage_layer.layer_name import ImageLayerName
from neonctl.errors import CorruptData


@dataclass(frozen=True)
class ImageLayerInfo:
    """What a finished writer produced."""

    path: Path
    name: ImageLayerName
    timeline_id: str
    file_size: int
    num_values: int

    @property
    def key_range(self) -> KeyRange:
        return self.name.key_range

    @property
    def lsn(self) -> int:
        return self.name.lsn


@dataclass
class ImageValues:
    """Many image values as columns: row i is key ``keys[i]`` with value ``buf[off[i]:off[i] + length[i]]``."""

    keys: np.ndarray  # (n, KEY_SIZE) uint8, ascending
    buf: np.ndarray  # uint8
    off: np.ndarray  # int64
    length: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.off)

    def key(self, i: int) -> Key:
        return Key.from_bytes(self.keys[i].tobytes())

    def value(self, i: int) -> bytes:
        return self.buf[self.off[i]:self.off[i] + self.length[i]].tobytes()


def write_image_layer(path: str | os.PathLike[str], timeline_id: str | bytes, key_range: KeyRange, lsn: int,
                      values: ImageValues) -> ImageLayerInfo:
    """Write an image layer from values whose keys are strictly ascending - the bulk ``ImageLayerWriter``."""
    name = ImageLayerName(key_range, lsn)  # validates range and LSN
    n = len(values)
    if n:
        first, last = values.key(0), values.key(n - 1)
        if not key_range.contains(first) or not key_range.contains(last):
            raise ValueError(f"keys {first}..{last} outside the layer's range {key_range}")
    packed = compress_smaller(values.buf, values.off, values.length)
    region, offsets = frame_blobs(values.buf, values.off, values.length, np.full(n, -1, dtype=np.int16), packed)
    summary, size = write_layer_file(path, IMAGE_MAGIC, normalize_timeline_id(timeline_id), key_range, lsn,
                                     lsn + 1, region, values.keys, (offsets + BLOCK_SIZE).astype(np.uint64))
    return ImageLayerInfo(Path(path), name, summary.timeline_id, size, n)


class ImageLayerWriter:
    """Writes one image layer; ``put`` in key order, then ``finish``.

    Use as a context manager: leaving the block without ``finish`` (or on an exception) removes the
    temporary file.
    """

    def __init__(self, path: str | os.PathLike[str], timeline_id: str | bytes, key_range: KeyRange, lsn: int):
        self.name = ImageLayerName(key_range, lsn)  # validates range and LSN
        self.timeline_id = normalize_timeline_id(timeline_id)
        self._file = LayerFileWriter(path, KEY_SIZE)
        self._last: Key | None = None
        self.num_values = 0

    def put(self, key: Key, page: bytes) -> None:
        if not self.name.key_range.contains(key):
            raise ValueError(f"key {key} outside the layer's range {self.name.key_range}")
        if self._last is not None and key <= self._last:
            raise ValueError(f"put({key}) is not after the previous key {self._last}")
        offset = self._file.write_blob(page, compress=True)
        self._file.index.append(key.to_bytes(), offset)
        self._last = key
        self.num_values += 1

    def finish(self) -> ImageLayerInfo:
        lsn = self.name.lsn
        summary = self._file.finish(IMAGE_MAGIC, self.timeline_id, self.name.key_range, lsn, lsn + 1)
        return ImageLayerInfo(self._file.path, self.name, summary.timeline_id, self._file.offset, self.num_values)

    def abort(self) -> None:
        self._file.abort()

    def __enter__(self) -> ImageLayerWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._file.__exit__(exc_type, exc, tb)


class ImageLayerReader:
    """Point and sequential reads of one image layer; corruption raises ``CorruptData``."""

    def __init__(self, path: str | os.PathLike[str]):
        self._file = LayerFileReader(path, IMAGE_MAGIC, "image", KEY_SIZE)
        self.path = self._file.path
        self.summary: LayerSummary = self._file.summary
        try:
            if self.summary.lsn_end != self.summary.lsn_start + 1:
                raise ValueError("an image layer's LSN range must be one LSN")
            self.name = ImageLayerName(self.summary.key_range, self.summary.lsn_start)
        except ValueError as e:
            self._file.close()
            raise CorruptData(f"{self.path}: bad summary: {e}") from e

    @property
    def key_range(self) -> KeyRange:
        return self.summary.key_range

    @property
    def lsn(self) -> int:
        return self.summary.lsn_start

    def get(self, key: Key) -> bytes | None:
        """The value of ``key`` at the layer's LSN; None means the key did not exist then."""
        if not self.key_range.contains(key):
            raise ValueError(f"key {key} outside the image layer's range {self.key_range}")
        offset = self._file.index.get(key.to_bytes())
        return None if offset is None else self._file.read_blob(offset)

    def iter_all(self) -> Iterator[tuple[Key, bytes]]:
        for kbytes, offset in self._file.index.iter_all():
            yield Key.from_bytes(kbytes), self._file.read_blob(offset)

    def read_all(self, scratch_name: str | None = None) -> ImageValues:
        """Every key and value of the layer, checksums verified, values back to back in key order.

        With ``scratch_name`` the values go into this thread's scratch buffer of that name (valid
        until its next use) instead of a new one.
        """
        keys, _, buf, off, length = self._file.read_all(contiguous=True, scratch_name=scratch_name)
        return ImageValues(keys, buf, off, length)

    def keys(self) -> Iterator[Key]:
        for kbytes, _ in self._file.index.iter_all():
            yield Key.from_bytes(kbytes)

    def key_array(self) -> tuple[np.ndarray, np.ndarray]:
        """All keys as (n, 18) uint8 rows and their blob offsets, without reading a value."""
        keys, offsets = self._file.index_entries()
        return keys, offsets.astype(np.int64)

    def value_at(self, offset: int) -> bytes:
        """The value whose blob starts at `offset` (from `key_array`)."""
        return self._file.read_blob(offset)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ImageLayerReader:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
