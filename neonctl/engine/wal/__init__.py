"""PostgreSQL WAL, sans I/O: find record boundaries in a byte stream (``reader``) and take records apart (``decoder``)."""

from neonctl.engine.wal.decoder import (
    BlockRef,
    CheckPoint,
    DecodedRecord,
    XactRecord,
    decode_record,
    parse_checkpoint,
    parse_dbase,
    parse_relmap,
    parse_smgr,
    parse_xact,
)
from neonctl.engine.wal.reader import (
    RawRecord,
    WalDecodeError,
    WalStreamDecoder,
    find_end_of_wal,
)

__all__ = [
    "BlockRef", "CheckPoint", "DecodedRecord", "RawRecord", "WalDecodeError", "WalStreamDecoder", "XactRecord",
    "decode_record", "find_end_of_wal", "parse_checkpoint", "parse_dbase", "parse_relmap", "parse_smgr", "parse_xact",
]
