"""Values stored under a key at an LSN: a full page image or a WAL record that modifies the page.

`Image` values initialise the page on their own; a `WalRecord` needs older
values beneath it unless Postgres flagged it will_init. The first byte tags the
kind so layer files stay opaque about what they carry.
"""

from __future__ import annotations

import struct

IMAGE = 0x01
WAL_RECORD = 0x02


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
