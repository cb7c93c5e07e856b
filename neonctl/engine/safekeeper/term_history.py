"""Term history: which elected proposer wrote which stretch of a timeline's WAL.

Every proposer (the process that streams a compute's WAL to the safekeepers)
is elected for a *term*, a number no two elections share. When the proposer of
term ``t`` starts writing, it records a switch ``(t, start_lsn)``: WAL from
``start_lsn`` up to the next switch was generated in term ``t``. The ascending
list of switches is the term history (Neon RFC 013). Knowing it is knowing the
term of every byte of WAL, which is what Raft stamps on each log entry.

Two safekeepers whose histories agree on a term hold the same bytes for that
term, up to where the shorter of the two stops. So the point where two copies
of the WAL diverge can be computed from the histories alone, without comparing
WAL: walk the histories from the start while the terms match, then take the
lower of the two ends of the last common term. The end of a term is the start
of the next term in that history, or, for the last term, the flush LSN of the
WAL it describes. The proposer's own history is unbounded: its last term is the
one it is writing now.

An acceptor's persisted history may run ahead of its WAL (it adopts the
proposer's history before it has received that WAL), so the history that
describes WAL actually held is always ``history.up_to(flush_lsn)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import pairwise
from typing import NamedTuple, overload

from neonctl.engine.lsn import format_lsn
from neonctl.errors import Conflict


class ProtocolViolation(Conflict):
    """A safekeeper consensus message or state breaks an invariant of the protocol.

    Never expected in a correct run; seeing one means a bug or a misdirected
    message, so the receiver refuses the message and changes nothing.
    """


class TermSwitch(NamedTuple):
    """The proposer of ``term`` began writing WAL at ``start_lsn``."""

    term: int
    start_lsn: int


class CommonPoint(NamedTuple):
    """The WAL of two histories is the same up to ``lsn``, which lies in ``term``."""

    term: int
    lsn: int


class TermHistory(Sequence[TermSwitch]):
    """An immutable, validated, ascending list of term switches."""

    __slots__ = ("_switches",)

    def __init__(self, switches: Iterable[TermSwitch | tuple[int, int]] = ()):
        if isinstance(switches, TermHistory):
            self._switches: tuple[TermSwitch, ...] = switches._switches
            return
        entries = tuple(e if type(e) is TermSwitch else TermSwitch(int(e[0]), int(e[1])) for e in switches)
        for prev, cur in pairwise(entries):
            if cur.term <= prev.term or cur.start_lsn < prev.start_lsn:
                raise ProtocolViolation(f"term history is not ascending: {_show(prev)} is followed by {_show(cur)}")
        for e in entries:
            if e.term < 0 or e.start_lsn < 0:
                raise ProtocolViolation(f"term history has a negative entry {tuple(e)}")
        self._switches = entries

    @classmethod
    def _trusted(cls, entries: tuple[TermSwitch, ...]) -> TermHistory:
        """Wrap entries known to be valid (a part of a validated history) without checking."""
        h = object.__new__(cls)
        h._switches = entries
        return h

    @overload
    def __getitem__(self, index: int) -> TermSwitch: ...
    @overload
    def __getitem__(self, index: slice) -> TermHistory: ...
    def __getitem__(self, index: int | slice) -> TermSwitch | TermHistory:
        if isinstance(index, slice):
            if index.step not in (None, 1):
                return TermHistory(self._switches[index])
            return TermHistory._trusted(self._switches[index])
        return self._switches[index]

    def __len__(self) -> int:
        return len(self._switches)

    def __iter__(self) -> Iterator[TermSwitch]:
        return iter(self._switches)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TermHistory):
            return self._switches == other._switches
        if isinstance(other, (list, tuple)):
            return list(self._switches) == [tuple(e) for e in other]
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._switches)

    def __repr__(self) -> str:
        return f"TermHistory([{', '.join(_show(e) for e in self._switches)}])"

    @property
    def last_term(self) -> int:
        """The term of the last switch, 0 for an empty history."""
        return self._switches[-1].term if self._switches else 0

    def up_to(self, lsn: int) -> TermHistory:
        """The switches that happened at or below ``lsn``.

        Applied to an acceptor's flush LSN this is the history of the WAL it
        really holds; a switch exactly at ``lsn`` is kept (a term that has
        started but has no bytes yet still counts as the last log term).
        """
        n = len(self._switches)
        while n and self._switches[n - 1].start_lsn > lsn:
            n -= 1
        return self if n == len(self._switches) else TermHistory._trusted(self._switches[:n])

    def term_at(self, lsn: int) -> int | None:
        """The term that generated the WAL byte at ``lsn`` (None below the first switch)."""
        term = None
        for e in self._switches:
            if e.start_lsn > lsn:
                break
            term = e.term
        return term

    def start_of(self, term: int) -> int | None:
        for e in self._switches:
            if e.term == term:
                return e.start_lsn
        return None

    def extended(self, term: int, start_lsn: int) -> TermHistory:
        """This history followed by a switch to ``term`` at ``start_lsn``."""
        return TermHistory((*self._switches, TermSwitch(term, start_lsn)))

    def to_list(self) -> list[TermSwitch]:
        return list(self._switches)


def find_highest_common_point(
    mine: Iterable[TermSwitch | tuple[int, int]],
    theirs: Iterable[TermSwitch | tuple[int, int]],
    their_flush_lsn: int,
    my_flush_lsn: int | None = None,
) -> CommonPoint | None:
    """The highest point where the WAL described by two histories is the same.

    Each history ends at its flush LSN; ``my_flush_lsn=None`` means mine is a
    proposer's history, which extends to infinity in its last term. Returns
    None when the histories share no term at all (then everything after the
    start of the proposer's history must be streamed).

    Both histories must describe WAL actually held: no switch above the flush
    LSN (pass ``h.up_to(flush_lsn)``). A term present in both with different
    start LSNs is impossible (one proposer owns a term), so it is refused.
    """
    mine_h = mine if isinstance(mine, TermHistory) else TermHistory(mine)
    theirs_h = theirs if isinstance(theirs, TermHistory) else TermHistory(theirs)
    for name, history, flush in (("their", theirs_h, their_flush_lsn), ("my", mine_h, my_flush_lsn)):
        if flush is not None and history and history[-1].start_lsn > flush:
            raise ProtocolViolation(
                f"{name} term history ends with {_show(history[-1])}, above its flush LSN {format_lsn(flush)}"
            )
    last_common: int | None = None
    for i, (a, b) in enumerate(zip(mine_h, theirs_h, strict=False)):
        if a.term != b.term:
            break
        if a.start_lsn != b.start_lsn:
            raise ProtocolViolation(
                f"term {a.term} starts at {format_lsn(a.start_lsn)} in one history and at "
                f"{format_lsn(b.start_lsn)} in the other"
            )
        last_common = i
    if last_common is None:
        return None
    my_end = _end_of(mine_h, last_common, my_flush_lsn)
    their_end = _end_of(theirs_h, last_common, their_flush_lsn)
    assert their_end is not None
    lsn = their_end if my_end is None else min(my_end, their_end)
    return CommonPoint(mine_h[last_common].term, lsn)


def _end_of(history: TermHistory, index: int, flush_lsn: int | None) -> int | None:
    """Where the term at ``index`` stops: the next switch, else the flush LSN."""
    if index + 1 < len(history):
        return history[index + 1].start_lsn
    return flush_lsn


def _show(e: TermSwitch) -> str:
    return f"(term {e.term} at {format_lsn(e.start_lsn)})"
