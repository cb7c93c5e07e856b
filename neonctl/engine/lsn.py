"""Log sequence numbers: Postgres' byte positions in the WAL stream.

An LSN is a 64-bit offset printed as two hex halves (``0/16B3748``). Everything
that is versioned in neonctl - WAL, layers, branch points - is addressed by LSN.
"""

from __future__ import annotations

import re

from neonctl.errors import InvalidInput

WAL_SEGMENT_SIZE = 16 * 1024 * 1024
XLOG_BLCKSZ = 8192

_LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def parse_lsn(text: str) -> int:
    """Parse ``X/Y`` into an integer, raising a one-line error on bad input."""
    m = _LSN_RE.match(text.strip())
    if not m:
        raise InvalidInput(f"invalid LSN {text!r}: expected the form 0/16B3748")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def segment_number(lsn: int, seg_size: int = WAL_SEGMENT_SIZE) -> int:
    return lsn // seg_size


def segment_file_name(segno: int, timeline: int = 1, seg_size: int = WAL_SEGMENT_SIZE) -> str:
    """Postgres' WAL file name (``000000010000000000000003``) for a segment number."""
    per_xlogid = 0x100000000 // seg_size
    return f"{timeline:08X}{segno // per_xlogid:08X}{segno % per_xlogid:08X}"


def parse_segment_file_name(name: str, seg_size: int = WAL_SEGMENT_SIZE) -> int:
    per_xlogid = 0x100000000 // seg_size
    return int(name[8:16], 16) * per_xlogid + int(name[16:24], 16)
