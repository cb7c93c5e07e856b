"""PostgreSQL WAL, sans I/O: find record boundaries in a byte stream (``reader``), take records apart
(``decoder``, ``page_image``) and read the main data of the ones neonctl acts on (``rmgr_records``)."""

from neonctl.engine.wal.decoder import BlockRef, DecodedRecord, decode_record
from neonctl.engine.wal.reader import (
    RawRecord,
    WalDecodeError,
    WalStreamDecoder,
    find_end_of_wal,
)
from neonctl.engine.wal.rmgr_records import (
    CheckPoint,
    XactRecord,
    parse_checkpoint,
    parse_dbase,
    parse_relmap,
    parse_smgr,
    parse_xact,
)

__all__ = [
    "BlockRef", "CheckPoint", "DecodedRecord", "RawRecord", "WalDecodeError", "WalStreamDecoder", "XactRecord",
    "decode_record", "find_end_of_wal", "parse_checkpoint", "parse_dbase", "parse_relmap", "parse_smgr", "parse_xact",
]
