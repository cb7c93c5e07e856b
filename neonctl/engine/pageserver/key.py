"""Keys: the pageserver's flat, ordered address space for everything Postgres stores.

The pageserver does not know about files. Every piece of state a compute can ask for - a relation
block, a relation's size, the list of databases, an SLRU page, pg_control - lives at one 18-byte
*key*, and a layer file holds versions of a contiguous key range. The layout follows Neon's
``Key``::

    field1 u8 | field2 u32 | field3 u32 | field4 u32 | field5 u8 | field6 u32     (big-endian)

field1 is a namespace prefix: 0x00 relations, 0x01 SLRUs, 0x02 two-phase state, 0x03 singletons
(control file, checkpoint). Within relations the fields are (spcnode, dbnode, relnode, forknum,
blkno), so the blocks of one relation fork are adjacent and its size entry (blkno 0xFFFFFFFF) sorts
right after its last block. Because every field is fixed-width and big-endian, comparing keys
field by field (tuple order) is exactly comparing their 18 bytes, which is what the on-disk B-tree
and the layer names rely on. A key prints as 36 upper-case hex characters.
"""

from __future__ import annotations

import re
import struct
from enum import IntEnum
from typing import NamedTuple

from neonctl.errors import InvalidInput

KEY_SIZE = 18
_STRUCT = struct.Struct(">BIIIBI")
_U8 = 0xFF
_U32 = 0xFFFFFFFF
_HEX_RE = re.compile(r"[0-9A-Fa-f]{36}")

# field1 namespaces
REL_PREFIX = 0x00
SLRU_PREFIX = 0x01
TWOPHASE_PREFIX = 0x02
SINGLETON_PREFIX = 0x03

# field6 marker for "size of this relation fork / SLRU segment"; also Postgres' InvalidBlockNumber.
SIZE_MARKER = _U32


class SlruKind(IntEnum):
    CLOG = 0
    MULTIXACT_MEMBERS = 1
    MULTIXACT_OFFSETS = 2


class _KeyFields(NamedTuple):
    field1: int
    field2: int
    field3: int
    field4: int
    field5: int
    field6: int


class Key(_KeyFields):
    """An 18-byte pageserver key; immutable, hashable, ordered exactly like its bytes."""

    __slots__ = ()

    def __new__(cls, field1: int, field2: int, field3: int, field4: int, field5: int, field6: int) -> Key:
        if not (
            0 <= field1 <= _U8
            and 0 <= field2 <= _U32
            and 0 <= field3 <= _U32
            and 0 <= field4 <= _U32
            and 0 <= field5 <= _U8
            and 0 <= field6 <= _U32
        ):
            raise ValueError(f"key field out of range: {(field1, field2, field3, field4, field5, field6)}")
        return tuple.__new__(cls, (field1, field2, field3, field4, field5, field6))

    # -- encoding -------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        return _STRUCT.pack(*self)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> Key:
        if len(data) != KEY_SIZE:
            raise ValueError(f"a key is {KEY_SIZE} bytes, got {len(data)}")
        return tuple.__new__(cls, _STRUCT.unpack(data))

    def __str__(self) -> str:
        return self.to_bytes().hex().upper()

    def __repr__(self) -> str:
        return f"Key({self})"

    @classmethod
    def parse(cls, text: str) -> Key:
        """Parse the 36-hex-character form printed by ``str(key)``."""
        if not _HEX_RE.fullmatch(text):
            raise InvalidInput(f"invalid key {text!r}: expected 36 hex characters")
        return cls.from_bytes(bytes.fromhex(text))

    def to_int(self) -> int:
        return int.from_bytes(self.to_bytes(), "big")

    @classmethod
    def from_int(cls, value: int) -> Key:
        if not 0 <= value < 1 << (8 * KEY_SIZE):
            raise ValueError(f"key integer out of range: {value}")
        return cls.from_bytes(value.to_bytes(KEY_SIZE, "big"))

    def next(self) -> Key:
        """The smallest key greater than this one (``KeyRange(k, k.next())`` holds just ``k``)."""
        if self == MAX_KEY:
            raise ValueError("MAX_KEY has no successor")
        return Key.from_int(self.to_int() + 1)

    # -- classification ------------------------------------------------------------------------

    def is_rel_block(self) -> bool:
        return self.field1 == REL_PREFIX and self.field4 != 0 and self.field6 != SIZE_MARKER

    def is_rel_size(self) -> bool:
        return self.field1 == REL_PREFIX and self.field4 != 0 and self.field6 == SIZE_MARKER

    def is_dbdir(self) -> bool:
        return self == MIN_KEY

    def is_relmap(self) -> bool:
        return (
            self.field1 == REL_PREFIX
            and self.field4 == 0
            and self.field5 == 0
            and self.field6 == 0
            and (self.field2, self.field3) != (0, 0)
        )

    def is_reldir(self) -> bool:
        return self.field1 == REL_PREFIX and self.field4 == 0 and self.field5 == 0 and self.field6 == 1

    def is_slru_dir(self) -> bool:
        return self.field1 == SLRU_PREFIX and self.field3 == 0 and self.field4 == 0 and self.field6 == 0

    def is_slru_block(self) -> bool:
        return self.field1 == SLRU_PREFIX and self.field3 == 1 and self.field6 != SIZE_MARKER

    def is_slru_seg_size(self) -> bool:
        return self.field1 == SLRU_PREFIX and self.field3 == 1 and self.field6 == SIZE_MARKER

    def is_controlfile(self) -> bool:
        return self == _CONTROLFILE

    def is_checkpoint(self) -> bool:
        return self == _CHECKPOINT

    def rel_tag(self) -> tuple[int, int, int, int]:
        """(spcnode, dbnode, relnode, forknum) of a relation block or size key."""
        if not (self.is_rel_block() or self.is_rel_size()):
            raise ValueError(f"{self} is not a relation key")
        return (self.field2, self.field3, self.field4, self.field5)


MIN_KEY = Key(0, 0, 0, 0, 0, 0)
MAX_KEY = Key(_U8, _U32, _U32, _U32, _U8, _U32)
_CONTROLFILE = Key(SINGLETON_PREFIX, 0, 0, 0, 0, 0)
_CHECKPOINT = Key(SINGLETON_PREFIX, 0, 0, 0, 0, 1)


class KeyRange(NamedTuple):
    """Half-open key interval ``[start, end)``."""

    start: Key
    end: Key

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"

    def contains(self, key: Key) -> bool:
        return self.start <= key < self.end

    def overlaps(self, other: KeyRange) -> bool:
        """True if some key lies in both ranges (never for an empty range)."""
        return max(self.start, other.start) < min(self.end, other.end)

    def is_empty(self) -> bool:
        return self.start >= self.end


FULL_KEY_RANGE = KeyRange(MIN_KEY, MAX_KEY)


# -- constructors --------------------------------------------------------------------------------


def rel_block_key(spc: int, db: int, rel: int, fork: int, blkno: int) -> Key:
    if rel == 0:
        raise ValueError("relnode 0 is reserved for the relmap and reldir keys")
    if blkno == SIZE_MARKER:
        raise ValueError("block number 0xFFFFFFFF is InvalidBlockNumber")
    return Key(REL_PREFIX, spc, db, rel, fork, blkno)


def rel_size_key(spc: int, db: int, rel: int, fork: int) -> Key:
    if rel == 0:
        raise ValueError("relnode 0 is reserved for the relmap and reldir keys")
    return Key(REL_PREFIX, spc, db, rel, fork, SIZE_MARKER)


def rel_key_range(spc: int, db: int, rel: int, fork: int) -> KeyRange:
    """All keys of one relation fork: its blocks and its size entry."""
    start = Key(REL_PREFIX, spc, db, rel, fork, 0)
    return KeyRange(start, rel_size_key(spc, db, rel, fork).next())


def dbdir_key() -> Key:
    return MIN_KEY


def relmap_key(spc: int, db: int) -> Key:
    if (spc, db) == (0, 0):
        raise ValueError("relmap (0, 0) would collide with the dbdir key")
    return Key(REL_PREFIX, spc, db, 0, 0, 0)


def reldir_key(spc: int, db: int) -> Key:
    return Key(REL_PREFIX, spc, db, 0, 0, 1)


def slru_dir_key(kind: SlruKind | int) -> Key:
    return Key(SLRU_PREFIX, SlruKind(kind), 0, 0, 0, 0)


def slru_block_key(kind: SlruKind | int, segno: int, blkno: int) -> Key:
    if blkno == SIZE_MARKER:
        raise ValueError("block number 0xFFFFFFFF is reserved for the segment size")
    return Key(SLRU_PREFIX, SlruKind(kind), 1, segno, 0, blkno)


def slru_seg_size_key(kind: SlruKind | int, segno: int) -> Key:
    return Key(SLRU_PREFIX, SlruKind(kind), 1, segno, 0, SIZE_MARKER)


def controlfile_key() -> Key:
    return _CONTROLFILE


def checkpoint_key() -> Key:
    return _CHECKPOINT
