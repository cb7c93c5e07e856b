"""Values stored under a key at an LSN: a full page image or a WAL record that modifies the page.

`Image` values initialise the page on their own; a `WalRecord` needs older
values beneath it unless Postgres flagged it will_init; an `Fpi` is a
full-page image Postgres applies from a WAL record, kept as the record stored
it (hole removed, maybe compressed) behind a 5-byte header (bimg_info, hole
offset, hole length): ingest copies bytes and leaves restoring the page to
the rare reader that wants it. The first byte tags the kind so layer files
stay opaque about what they carry.
"""

from __future__ import annotations

import struct

IMAGE = 0x01
WAL_RECORD = 0x02
FPI = 0x03
KIND_NAMES = {IMAGE: "image", WAL_RECORD: "wal_record", FPI: "full_page_image"}


def image(data: bytes) -> bytes:
    return bytes([IMAGE]) + data


def wal_record(raw: bytes) -> bytes:
    return bytes([WAL_RECORD]) + raw


def rel_size(nblocks: int) -> bytes:
    return image(struct.pack("<I", nblocks))


def kind(value: bytes) -> int:
    return value[0]


def payload(value: bytes) -> bytes:
    return value[1:]


FPI_HEADER = struct.Struct("<BHH")  # bimg_info, hole_offset, hole_length


def page_image(v: bytes) -> bytes | None:
    """The page a value holds on its own: an image's payload, or a full-page image restored (hole, compression)."""
    if v[0] == IMAGE:
        return v[1:]
    if v[0] != FPI:
        return None
    from neonctl.engine.wal.decoder import BlockRef  # noqa: PLC0415 - only page reads need it
    from neonctl.engine.wal.page_image import restore_image  # noqa: PLC0415

    info, hole_offset, hole_length = FPI_HEADER.unpack_from(v, 1)
    blk = BlockRef(0, 0, 0, 0, 0, 0, bimg=v[1 + FPI_HEADER.size:], bimg_info=info, hole_offset=hole_offset,
                   hole_length=hole_length)
    return restore_image(blk)
