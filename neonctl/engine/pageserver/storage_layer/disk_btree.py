"""An immutable on-disk B+tree: the index inside every layer file.

A layer file maps fixed-width byte keys (an 18-byte ``Key``, plus an 8-byte LSN in delta layers) to
small integers (the offset of a value in the file). The map is written once, from input that is
already sorted, and never changed - so the tree is built bottom-up: leaves are filled left to
right, each full node is written out and its first key and block number are pushed into the level
above, and the root is the last block written. No rebalancing and no free space: every node but
the last of its level is full.

Every node is one 8192-byte block::

    u32  crc32c of bytes 4..8192 (so a flipped bit anywhere in a node is caught, not followed)
    u16  num_children
    u8   level            (0 = leaf)
    u8   prefix_len       (bytes shared by every key in the node, stored once)
    u8   suffix_len       (prefix_len + suffix_len == key_len)
    prefix, then num_children suffixes, then num_children 5-byte big-endian values, zero padding

This is Neon's ``disk_btree`` node with a checksum in front. Keys inside a layer share long
prefixes (same relation, same block), so storing the common prefix once multiplies the fan-out
of a leaf by two to four. In a leaf a value is the caller's payload (< 2**40); in an inner node it is the block
number of a child whose first key is the entry's key. Children are always written before their
parent, so a child's block number is smaller than its parent's - the reader checks this, which
rules out cycles even in a file whose checksums were forged.

The reader is pure: it is given ``read_block(blk) -> bytes`` and never touches files itself. A
node is searched in place (binary search over the fixed-width suffixes), so loading one costs a
checksum and a header unpack; a small cache of verified nodes keeps the upper levels hot.
"""

from __future__ import annotations

import struct
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator

import crc32c
import numpy as np

from neonctl.engine.jit import CRC_TABLE, byte_at, crc32c_range, jit
from neonctl.errors import CorruptData

NODE_SIZE = 8192
VALUE_SIZE = 5
MAX_VALUE = 1 << (8 * VALUE_SIZE)
_HEADER = struct.Struct(">IHBBB")
HEADER_SIZE = _HEADER.size  # 9
_MAX_LEVELS = 32
_HOT_NODE_SEARCHES = 8  # after this many searches a cached node gets a list of suffixes for C bisect


def _check_key_len(key_len: int) -> None:
    if not 1 <= key_len <= 255:
        raise ValueError(f"B-tree key length must be 1..255 bytes, got {key_len}")


class _NodeBuffer:
    """Entries of the node being filled at one level of the builder."""

    __slots__ = ("key_len", "keys", "values", "prefix_len", "first_int")

    def __init__(self, key_len: int):
        self.key_len = key_len
        self.keys: list[bytes] = []
        self.values: list[int] = []
        self.prefix_len = 0
        self.first_int = 0

    def try_add(self, key: bytes, value: int) -> bool:
        n = len(self.keys)
        if n == 0:
            self.first_int = int.from_bytes(key, "big")
            self.prefix_len = self.key_len
        else:
            # Keys arrive sorted, so the prefix shared by all of them is the one shared by the
            # first and the newest. XOR of the two as integers gives it without a byte loop.
            diff = self.first_int ^ int.from_bytes(key, "big")
            common = (self.key_len * 8 - diff.bit_length()) // 8
            p = min(self.prefix_len, common)
            if HEADER_SIZE + p + (n + 1) * (self.key_len - p + VALUE_SIZE) > NODE_SIZE:
                return False
            self.prefix_len = p
        self.keys.append(key)
        self.values.append(value)
        return True

    def encode(self, level: int) -> bytes:
        n = len(self.keys)
        p = self.prefix_len if n else 0
        block = bytearray(NODE_SIZE)
        parts = [self.keys[0][:p]] if n else []
        parts.extend(k[p:] for k in self.keys)
        parts.extend(v.to_bytes(VALUE_SIZE, "big") for v in self.values)
        body = b"".join(parts)
        block[HEADER_SIZE : HEADER_SIZE + len(body)] = body
        struct.pack_into(">HBBB", block, 4, n, level, p, self.key_len - p)
        struct.pack_into(">I", block, 0, crc32c.crc32c(memoryview(block)[4:]))
        return bytes(block)

    def reset(self) -> None:
        self.keys = []
        self.values = []


class BTreeBuilder:
    """Builds a tree from strictly increasing keys; blocks go to ``write_block`` in file order.

    ``start_blk`` is the block number the first written node will have (the caller's file
    position), so child pointers inside the tree are absolute block numbers.
    """

    def __init__(self, key_len: int, write_block: Callable[[bytes], object], start_blk: int = 0):
        _check_key_len(key_len)
        self.key_len = key_len
        self._write_block = write_block
        self._start_blk = start_blk
        self._next_blk = start_blk
        self._levels = [_NodeBuffer(key_len)]
        self._last_key: bytes | None = None
        self._finished = False
        self.count = 0

    def append(self, key: bytes, value: int) -> None:
        if self._finished:
            raise ValueError("B-tree builder already finished")
        if len(key) != self.key_len:
            raise ValueError(f"B-tree key must be {self.key_len} bytes, got {len(key)}")
        if self._last_key is not None and key <= self._last_key:
            kind = "duplicate" if key == self._last_key else "unsorted"
            raise ValueError(f"{kind} B-tree key {key.hex()} after {self._last_key.hex()}")
        if not 0 <= value < MAX_VALUE:
            raise ValueError(f"B-tree value {value} does not fit in {VALUE_SIZE} bytes")
        key = bytes(key)
        self._push(0, key, value)
        self._last_key = key
        self.count += 1

    def _push(self, level: int, key: bytes, value: int) -> None:
        node = self._levels[level]
        if node.try_add(key, value):
            return
        first_key = node.keys[0]
        blk = self._flush(node, level)
        if level + 1 == len(self._levels):
            if level + 1 >= _MAX_LEVELS:
                raise ValueError("B-tree too deep")
            self._levels.append(_NodeBuffer(self.key_len))
        self._push(level + 1, first_key, blk)
        node.try_add(key, value)

    def _flush(self, node: _NodeBuffer, level: int) -> int:
        self._write_block(node.encode(level))
        node.reset()
        blk = self._next_blk
        self._next_blk += 1
        return blk

    def finish(self) -> tuple[int, int]:
        """Write the partly filled nodes, root last. Returns (root_blk, number of blocks written)."""
        if self._finished:
            raise ValueError("B-tree builder already finished")
        self._finished = True
        level = 0
        while True:
            node = self._levels[level]
            first_key = node.keys[0] if node.keys else b""
            blk = self._flush(node, level)
            if level == len(self._levels) - 1:
                return blk, self._next_blk - self._start_blk
            self._push(level + 1, first_key, blk)
            level += 1


@jit
def _first_unsorted(keys):
    """Index of the first key not strictly above its predecessor, or -1."""
    n, klen = keys.shape
    for i in range(1, n):
        c = 0
        while c < klen and keys[i, c] == keys[i - 1, c]:
            c += 1
        if c == klen or keys[i, c] < keys[i - 1, c]:
            return i
    return -1


@jit
def _pack_level(keys, values, level, out, firsts, table):
    """Fill nodes greedily left to right (the same rule as ``_NodeBuffer.try_add``); returns the count.

    ``out[m]`` receives node m, ``firsts[m]`` the index of its first key.
    """
    n, klen = keys.shape
    m = 0
    i = 0
    while i < n or (n == 0 and m == 0):
        p = klen
        cnt = 1 if n else 0
        while i + cnt < n:
            c = 0
            while c < p and keys[i, c] == keys[i + cnt, c]:
                c += 1
            if 9 + c + (cnt + 1) * (klen - c + 5) > 8192:
                break
            p = c
            cnt += 1
        if cnt == 0:
            p = 0
        blk = out[m]
        blk[4] = (cnt >> 8) & 0xFF
        blk[5] = cnt & 0xFF
        blk[6] = level
        blk[7] = p
        blk[8] = klen - p
        pos = 9
        for c in range(p):
            blk[pos + c] = keys[i, c]
        pos += p
        for j in range(cnt):
            for c in range(p, klen):
                blk[pos] = keys[i + j, c]
                pos += 1
        for j in range(cnt):
            v = values[i + j]
            for b in range(5):
                blk[pos + b] = (v >> np.uint64(8 * (4 - b))) & np.uint64(0xFF)
            pos += 5
        crc = crc32c_range(blk, 4, 8192, table)
        blk[0] = (crc >> 24) & 0xFF
        blk[1] = (crc >> 16) & 0xFF
        blk[2] = (crc >> 8) & 0xFF
        blk[3] = crc & 0xFF
        firsts[m] = i
        m += 1
        i += cnt
    return m


def build_sorted(keys: np.ndarray, values: np.ndarray, start_blk: int = 0) -> tuple[bytes, int, int]:
    """Build a whole tree at once from sorted rows; returns (blocks, root_blk, number of blocks).

    The bulk form of ``BTreeBuilder`` for layer writers that hold every entry in
    arrays already: ``keys`` is an (n, key_len) uint8 array of strictly increasing
    keys, ``values`` their payloads. Nodes are filled by the same greedy rule; all
    leaves come first, then each level above, root last.
    """
    keys = np.ascontiguousarray(keys, dtype=np.uint8)
    n, key_len = keys.shape
    _check_key_len(key_len)
    values = np.ascontiguousarray(values, dtype=np.uint64)
    if len(values) != n:
        raise ValueError(f"{n} keys but {len(values)} values")
    if n and int(values.max()) >= MAX_VALUE:
        raise ValueError(f"B-tree value {int(values.max())} does not fit in {VALUE_SIZE} bytes")
    bad = _first_unsorted(keys)
    if bad >= 0:
        kind = "duplicate" if bytes(keys[bad]) == bytes(keys[bad - 1]) else "unsorted"
        raise ValueError(f"{kind} B-tree key {bytes(keys[bad]).hex()} after {bytes(keys[bad - 1]).hex()}")
    chunks = []
    next_blk = start_blk
    level = 0
    min_fanout = (NODE_SIZE - HEADER_SIZE) // (key_len + VALUE_SIZE)
    while True:
        cap = len(keys) // min_fanout + 2
        out = np.zeros((cap, NODE_SIZE), dtype=np.uint8)
        firsts = np.zeros(cap, dtype=np.int64)
        m = _pack_level(keys, values, level, out, firsts, CRC_TABLE)
        chunks.append(out[:m])
        blks = np.arange(next_blk, next_blk + m, dtype=np.uint64)
        next_blk += m
        if m == 1:
            return b"".join(c.tobytes() for c in chunks), next_blk - 1, next_blk - start_blk
        if level + 1 >= _MAX_LEVELS:
            raise ValueError("B-tree too deep")
        keys, values = np.ascontiguousarray(keys[firsts[:m]]), blks
        level += 1


@jit
def _decode_leaves(blocks, key_len, keys_out, values_out, table):
    """Entries of every leaf in ``blocks`` (in block order); returns (count, index of a bad block or -1)."""
    nblk = blocks.shape[0] // 8192
    k = 0
    for b in range(nblk):
        base = b * 8192
        stored = (byte_at(blocks, base) << 24) | (byte_at(blocks, base + 1) << 16) | \
            (byte_at(blocks, base + 2) << 8) | byte_at(blocks, base + 3)
        if crc32c_range(blocks, base + 4, base + 8192, table) != stored:
            return k, b
        cnt = (np.int64(blocks[base + 4]) << 8) | np.int64(blocks[base + 5])
        level = blocks[base + 6]
        p = np.int64(blocks[base + 7])
        s = np.int64(blocks[base + 8])
        if p + s != key_len or 9 + p + cnt * (s + 5) > 8192:
            return k, b
        if level != 0:
            continue
        if k + cnt > keys_out.shape[0]:
            return k, b
        sfx = base + 9 + p
        vat = sfx + cnt * s
        for j in range(cnt):
            for c in range(p):
                keys_out[k, c] = blocks[base + 9 + c]
            for c in range(s):
                keys_out[k, p + c] = blocks[sfx + j * s + c]
            v = np.uint64(0)
            for c in range(5):
                v = (v << np.uint64(8)) | np.uint64(blocks[vat + j * 5 + c])
            values_out[k] = v
            k += 1
    return k, -1


def read_all_leaves(blocks: bytes, key_len: int, name: str = "B-tree") -> tuple[np.ndarray, np.ndarray]:
    """Every (key, value) of a tree from all of its blocks at once, in key order.

    Leaves are written in key order by both builders, so reading them in block
    order yields the entries sorted; the order is re-checked, and every block's
    checksum, so a damaged index raises ``CorruptData`` like a lookup would.
    """
    buf = np.frombuffer(blocks, dtype=np.uint8)
    if len(buf) % NODE_SIZE:
        raise CorruptData(f"{name}: index is {len(buf)} bytes, not whole blocks")
    cap = (len(buf) // NODE_SIZE) * ((NODE_SIZE - HEADER_SIZE) // VALUE_SIZE)
    keys = np.empty((cap, key_len), dtype=np.uint8)
    values = np.empty(cap, dtype=np.uint64)
    n, bad = _decode_leaves(buf, key_len, keys, values, CRC_TABLE)
    if bad >= 0:
        raise CorruptData(f"{name}: B-tree block {bad}: checksum mismatch or bad header")
    keys, values = keys[:n], values[:n]
    if _first_unsorted(keys) >= 0:
        raise CorruptData(f"{name}: B-tree leaves are out of order")
    return keys, values


class _Node:
    """A verified node, searched in place: no per-entry objects are built when it is loaded."""

    __slots__ = ("blk", "block", "level", "n", "plen", "prefix", "searches", "sfx_at", "slen", "suffixes", "val_at")

    def __init__(self, blk: int, block: bytes, level: int, n: int, plen: int, slen: int):
        self.blk = blk
        self.block = block
        self.level = level
        self.n = n
        self.plen = plen
        self.slen = slen
        self.prefix = block[HEADER_SIZE : HEADER_SIZE + plen]
        self.sfx_at = HEADER_SIZE + plen
        self.val_at = self.sfx_at + n * slen
        self.searches = 0
        self.suffixes: list[bytes] | None = None  # built once the node proves hot

    def position(self, key: bytes, right: bool) -> int:
        """bisect_right (``right``) or bisect_left of ``key`` among this node's keys."""
        head = key[: self.plen]
        if head != self.prefix:
            return 0 if head < self.prefix else self.n
        tail = key[self.plen :]
        block, base, s = self.block, self.sfx_at, self.slen
        suffixes = self.suffixes
        if suffixes is None:
            self.searches += 1
            if self.searches >= _HOT_NODE_SEARCHES:
                end = base + self.n * s
                suffixes = self.suffixes = [block[i : i + s] for i in range(base, end, s)] if s else [b""] * self.n
        if suffixes is not None:
            return bisect_right(suffixes, tail) if right else bisect_left(suffixes, tail)
        lo, hi = 0, self.n
        if right:
            while lo < hi:
                mid = (lo + hi) >> 1
                at = base + mid * s
                if tail < block[at : at + s]:
                    hi = mid
                else:
                    lo = mid + 1
        else:
            while lo < hi:
                mid = (lo + hi) >> 1
                at = base + mid * s
                if block[at : at + s] < tail:
                    lo = mid + 1
                else:
                    hi = mid
        return lo

    def key(self, i: int) -> bytes:
        at = self.sfx_at + i * self.slen
        return self.prefix + self.block[at : at + self.slen]

    def value(self, i: int) -> int:
        at = self.val_at + i * VALUE_SIZE
        return int.from_bytes(self.block[at : at + VALUE_SIZE], "big")

    def entries(self, indexes: range) -> Iterator[tuple[bytes, int]]:
        block, prefix, s = self.block, self.prefix, self.slen
        sfx_at, val_at = self.sfx_at, self.val_at
        for i in indexes:
            at = sfx_at + i * s
            vat = val_at + i * VALUE_SIZE
            yield prefix + block[at : at + s], int.from_bytes(block[vat : vat + VALUE_SIZE], "big")


class BTreeReader:
    """Lookups and range scans over a tree built by ``BTreeBuilder``.

    Damaged nodes raise ``CorruptData`` naming ``name`` (the layer file) and the block.
    """

    def __init__(
        self,
        read_block: Callable[[int], bytes],
        root_blk: int,
        key_len: int,
        *,
        name: str = "B-tree",
        cache_nodes: int = 32,
    ):
        _check_key_len(key_len)
        self._read_block = read_block
        self.root_blk = root_blk
        self.key_len = key_len
        self.name = name
        self._cache: dict[int, _Node] = {}
        self._cache_nodes = cache_nodes

    # -- node access -----------------------------------------------------------------------------

    def _corrupt(self, blk: int, what: str) -> CorruptData:
        return CorruptData(f"{self.name}: B-tree block {blk}: {what}")

    def _node(self, blk: int) -> _Node:
        node = self._cache.get(blk)
        if node is not None:
            return node
        block = self._read_block(blk)
        if not isinstance(block, bytes):
            block = bytes(block)
        if len(block) != NODE_SIZE:
            raise self._corrupt(blk, f"short read ({len(block)} of {NODE_SIZE} bytes)")
        crc, n, level, plen, slen = _HEADER.unpack_from(block)
        if crc != crc32c.crc32c(memoryview(block)[4:]):
            raise self._corrupt(blk, "checksum mismatch")
        if plen + slen != self.key_len or level >= _MAX_LEVELS:
            raise self._corrupt(blk, f"bad header (prefix {plen}, suffix {slen}, level {level})")
        if HEADER_SIZE + plen + n * (slen + VALUE_SIZE) > NODE_SIZE or (n == 0 and level > 0):
            raise self._corrupt(blk, f"bad entry count {n}")
        node = _Node(blk, block, level, n, plen, slen)
        if len(self._cache) >= self._cache_nodes:
            del self._cache[next(iter(self._cache))]
        self._cache[blk] = node
        return node

    def _child(self, parent: _Node, i: int) -> _Node:
        blk = parent.value(i)
        if blk >= parent.blk:
            raise self._corrupt(parent.blk, f"child pointer {blk} does not point backwards")
        child = self._node(blk)
        if child.level != parent.level - 1:
            raise self._corrupt(blk, f"level {child.level} under a level-{parent.level} node")
        return child

    def _check_key(self, key: bytes) -> None:
        if len(key) != self.key_len:
            raise ValueError(f"B-tree key must be {self.key_len} bytes, got {len(key)}")

    # -- queries ---------------------------------------------------------------------------------

    def get(self, key: bytes) -> int | None:
        self._check_key(key)
        node = self._node(self.root_blk)
        while node.level > 0:
            i = node.position(key, right=True) - 1
            if i < 0:
                return None
            node = self._child(node, i)
        i = node.position(key, right=False)
        if i < node.n and node.key(i) == key:
            return node.value(i)
        return None

    def iter_from(self, start_key: bytes, forward: bool = True) -> Iterator[tuple[bytes, int]]:
        """Entries with key >= start_key ascending, or (``forward=False``) key <= start_key descending."""
        self._check_key(start_key)
        node = self._node(self.root_blk)
        stack: list[list] = []  # [inner node, index of the child being visited]
        while node.level > 0:
            i = node.position(start_key, right=True) - 1
            if i < 0:
                if not forward:
                    return
                i = 0
            stack.append([node, i])
            node = self._child(node, i)
        if forward:
            i = node.position(start_key, right=False)
        else:
            i = node.position(start_key, right=True) - 1
        while True:
            yield from node.entries(range(i, node.n) if forward else range(i, -1, -1))
            # Climb to the nearest ancestor with an unvisited child, then down to the next leaf.
            while stack:
                frame = stack[-1]
                frame[1] += 1 if forward else -1
                if 0 <= frame[1] < frame[0].n:
                    break
                stack.pop()
            else:
                return
            node = self._child(frame[0], frame[1])
            while node.level > 0:
                i = 0 if forward else node.n - 1
                stack.append([node, i])
                node = self._child(node, i)
            i = 0 if forward else node.n - 1

    def iter_all(self) -> Iterator[tuple[bytes, int]]:
        return self.iter_from(bytes(self.key_len))
