"""How a WAL scan kernel says why it stopped, and the error text that becomes.

The numba kernels in ``record_scan`` return small integer codes (they cannot
build exceptions); this module turns a code and its details into the same
``WalDecodeError`` message ``reader.py`` (pages, record framing) or
``decoder.py`` (record contents) would raise, so both paths read alike.
"""

from __future__ import annotations

import numpy as np

from neonctl.engine.lsn import format_lsn
from neonctl.engine.wal.reader import WalDecodeError

_U64 = 0xFFFF_FFFF_FFFF_FFFF

# kernel status: >= 0 is how the scan stopped, < 0 an error (details in err[1:])
ST_MORE, ST_ZEROS, ST_GROW = 0, 1, 2
(E_MAGIC_DIFFERS, E_MAGIC_UNKNOWN, E_INFO_BITS, E_PAGEADDR, E_NO_LONG, E_SEGSIZE, E_SYSID, E_UNEXPECTED_LONG,
 E_CONT_AFTER_END, E_REC_LEN, E_NO_CONTREC, E_CONTREC_LEN, E_CRC, E_PREV,
 D_BLOCK_ID, D_ORDER, D_NO_DATA, D_DATA_LEN, D_COMPRESSED_FULL, D_BAD_HOLE, D_HOLE, D_SAME_REL, D_RUNS_PAST,
 D_PAYLOAD) = range(-1, -25, -1)


# reader.py's messages ("invalid WAL at <page or record>: ..."), then decoder.py's ("invalid WAL record at ...");
# {a} {b} {c} are err[2:5], {la}/{lb} those as LSNs, {ua}/{ub} as unsigned 64-bit numbers.
_MESSAGES = {
    E_MAGIC_DIFFERS: "page magic {a:#06x} differs from {b:#06x}",
    E_MAGIC_UNKNOWN: "unknown page magic {a:#06x} (PostgreSQL 15-18 expected)",
    E_INFO_BITS: "invalid page info bits {a:#06x}",
    E_PAGEADDR: "page address is {la}",
    E_NO_LONG: "segment's first page lacks the long header",
    E_SEGSIZE: "segment size {a}/page size {b} do not match",
    E_SYSID: "system identifier {ua} differs from {ub}",
    E_UNEXPECTED_LONG: "unexpected long page header",
    E_CONT_AFTER_END: "page continues a record although the previous one ended",
    E_REC_LEN: "invalid record length {a}",
    E_NO_CONTREC: "record at {la} continues on a page without contrecord flag",
    E_CONTREC_LEN: "contrecord length {a}, expected {b}",
    E_CRC: "incorrect record CRC",
    E_PREV: "record has prev-link {la}, expected {lb}",
    D_BLOCK_ID: "invalid block_id {a}",
    D_ORDER: "out-of-order block_id {a}",
    D_NO_DATA: "BKPBLOCK_HAS_DATA set, but no data included",
    D_DATA_LEN: "BKPBLOCK_HAS_DATA not set, but data length is {a}",
    D_COMPRESSED_FULL: "compressed block image has full length",
    D_BAD_HOLE: "bad hole (offset {a}, length {b}, image {c})",
    D_HOLE: "hole without BKPIMAGE_HAS_HOLE (offset {a}, length {b})",
    D_SAME_REL: "BKPBLOCK_SAME_REL set but no previous rel",
    D_RUNS_PAST: "record header runs past its length",
    D_PAYLOAD: "{a} bytes of payload, headers promise {b}",
}


def scan_error(code: int, err: np.ndarray) -> WalDecodeError:
    """The WalDecodeError reader.py (pages, record framing) or decoder.py (record contents) would raise."""
    a, b, c = int(err[2]), int(err[3]), int(err[4])
    ua, ub = a & _U64, b & _U64
    msg = _MESSAGES[code].format(a=a, b=b, c=c, ua=ua, ub=ub, la=format_lsn(ua), lb=format_lsn(ub))
    where = "WAL record" if code <= D_BLOCK_ID else "WAL"
    return WalDecodeError(f"invalid {where} at {format_lsn(int(err[1]))}: {msg}")
