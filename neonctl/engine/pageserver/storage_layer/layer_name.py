"""Layer file names: a layer's key range and LSN range, readable from its name alone.

The pageserver finds out what a timeline holds by listing its directory (or the remote index)
without opening any file, so every layer's coverage is encoded in its file name, as in Neon::

    delta  <key start>-<key end>__<lsn start>-<lsn end>     key range and LSN range half-open
    image  <key start>-<key end>__<lsn>                     a snapshot of the key range at one LSN

Keys are 36 upper-case hex characters, LSNs 16. Parsing is strict - only the exact form that
``str()`` prints is accepted - so one layer can never appear under two different names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from neonctl.engine.pageserver.key import Key, KeyRange
from neonctl.errors import InvalidInput

_U64 = (1 << 64) - 1
_NAME_RE = re.compile(r"([0-9A-F]{36})-([0-9A-F]{36})__([0-9A-F]{16})(?:-([0-9A-F]{16}))?")


def _check_range(key_range: KeyRange) -> None:
    if not key_range.start < key_range.end:
        raise ValueError(f"empty key range {key_range}")


@dataclass(frozen=True)
class DeltaLayerName:
    key_range: KeyRange
    lsn_start: int
    lsn_end: int

    def __post_init__(self) -> None:
        _check_range(self.key_range)
        if not 0 <= self.lsn_start < self.lsn_end <= _U64:
            raise ValueError(f"bad delta LSN range {self.lsn_start:#x}..{self.lsn_end:#x}")

    def __str__(self) -> str:
        return f"{self.key_range}__{self.lsn_start:016X}-{self.lsn_end:016X}"

    @classmethod
    def parse(cls, text: str) -> DeltaLayerName:
        name = parse_layer_name(text)
        if not isinstance(name, cls):
            raise InvalidInput(f"{text!r} is an image layer name, not a delta layer name")
        return name


@dataclass(frozen=True)
class ImageLayerName:
    key_range: KeyRange
    lsn: int

    def __post_init__(self) -> None:
        _check_range(self.key_range)
        if not 0 <= self.lsn < _U64:
            raise ValueError(f"bad image LSN {self.lsn:#x}")

    def __str__(self) -> str:
        return f"{self.key_range}__{self.lsn:016X}"

    @classmethod
    def parse(cls, text: str) -> ImageLayerName:
        name = parse_layer_name(text)
        if not isinstance(name, cls):
            raise InvalidInput(f"{text!r} is a delta layer name, not an image layer name")
        return name


LayerName = DeltaLayerName | ImageLayerName


def parse_layer_name(text: str) -> LayerName:
    """Parse either kind of layer file name; anything else raises ``InvalidInput``."""
    m = _NAME_RE.fullmatch(text)
    if not m:
        raise InvalidInput(
            f"invalid layer file name {text!r}",
            hint="expected <36 hex>-<36 hex>__<16 hex>[-<16 hex>], upper-case",
        )
    key_range = KeyRange(Key.parse(m.group(1)), Key.parse(m.group(2)))
    lsn_start = int(m.group(3), 16)
    try:
        if m.group(4) is None:
            return ImageLayerName(key_range, lsn_start)
        return DeltaLayerName(key_range, lsn_start, int(m.group(4), 16))
    except ValueError as e:
        raise InvalidInput(f"invalid layer file name {text!r}: {e}") from e
