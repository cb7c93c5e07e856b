"""Key bounds in words: which relation, fork and block a layer's key range starts and ends at.

A pageserver key (`pageserver/key.py`) is ``field1 | spc | db | rel | fork | blk``; under the
relation prefix (0x00, rel != 0) its fields name a relation fork's block, or the fork's size when
blk is 0xFFFFFFFF. Layer bounds are arbitrary keys, so the decoded form is a bound, not a page:
the end bound is exclusive and is often the first key of the *next* relation.
"""

from __future__ import annotations

import struct

FORK_NAMES = {0: "main", 1: "fsm", 2: "vm", 3: "init"}
_FIELDS = struct.Struct(">BIIIBI")
SIZE_MARKER = 0xFFFFFFFF
_SPACES = {0x00: "rel", 0x01: "slru", 0x02: "twophase", 0x03: "meta"}


def decode_key(hex_key: str) -> dict:
    """`{space, rel, fork, block}` of a 36-hex-character key: rel as 'spc/db/relfilenode' for
    relation keys (else None), fork by name, block None for a fork's size entry."""
    f1, spc, db, rel, fork, blk = _FIELDS.unpack(bytes.fromhex(hex_key))
    space = _SPACES.get(f1, "max" if f1 == 0xFF else "other")
    if f1 == 0x00 and rel != 0:
        return {"space": space, "rel": f"{spc}/{db}/{rel}", "fork": FORK_NAMES.get(fork, str(fork)),
                "block": None if blk == SIZE_MARKER else blk}
    if f1 == 0x00:
        space = "dbdir"  # relation directories and relmaps: rel 0 under a database
    return {"space": space, "rel": None, "fork": None, "block": None}


def relation_key_range(spc: int, db: int, relfilenode: int) -> tuple[str, str]:
    """[first key, first key after) of every fork of a relation: all its blocks and size entries."""
    start = _FIELDS.pack(0, spc, db, relfilenode, 0, 0).hex().upper()
    end = _FIELDS.pack(0, spc, db, relfilenode + 1, 0, 0).hex().upper() if relfilenode < 0xFFFFFFFF else \
        _FIELDS.pack(0, spc, db + 1, 0, 0, 0).hex().upper()
    return start, end
