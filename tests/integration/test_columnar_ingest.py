"""Columnar ingest (scan -> entries -> L0 -> L1) gives exactly what the per-record reference gives.

The reference walks records with the Python reader and decoder and applies the
documented rules one record at a time; the fast path must produce the same
(key, LSN, will_init, value) set from real WAL, through an L0 freeze and
through compaction, and the bulk layer writers must write what the streaming
writers write.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from neonctl.engine.pageserver import value
from neonctl.engine.pageserver.config import PageserverConfig
from neonctl.engine.pageserver.key import (
    MAX_KEY,
    MIN_KEY,
    Key,
    rel_block_key,
    rel_size_key,
)
from neonctl.engine.pageserver.key_columns import key_order
from neonctl.engine.pageserver.storage_layer.delta_layer import (
    DeltaEntries,
    DeltaLayerReader,
    DeltaLayerWriter,
    write_delta_layer,
)
from neonctl.engine.pageserver.storage_layer.disk_btree import (
    NODE_SIZE,
    BTreeBuilder,
    BTreeReader,
    build_sorted,
    read_all_leaves,
)
from neonctl.engine.pageserver.storage_layer.inmemory_layer import sorted_entries
from neonctl.engine.pageserver.timeline.layer_manager import LayerStore
from neonctl.engine.wal.decoder import decode_record
from neonctl.engine.wal.reader import WalStreamDecoder
from neonctl.engine.wal.record_scan import scan_wal
from neonctl.engine.wal.rmgr_records import SmgrTruncate, parse_smgr


def reference_entries(sample) -> dict[tuple[Key, int], tuple[bool, bytes]]:
    """The ingest rules applied record by record with the Python decoder."""
    dec = WalStreamDecoder(sample.start_lsn, sample.seg_size)
    dec.feed(sample.read(sample.start_lsn, sample.end_lsn - sample.start_lsn))
    sizes: dict = {}
    out: dict = {}

    def put(key, lsn, wi, v):
        if (key, lsn) in out:
            wi = wi or out[(key, lsn)][0]
        out[(key, lsn)] = (wi, v)

    while (raw := dec.poll()) is not None:
        rec = decode_record(raw, sample.version)
        for b in rec.blocks:
            key = rel_block_key(b.spc, b.db, b.rel, b.forknum, b.blkno)
            if b.has_image and b.apply_image:
                head = value.FPI_HEADER.pack(b.bimg_info, b.hole_offset, b.hole_length)
                put(key, raw.lsn, True, bytes([value.FPI]) + head + b.bimg)
            else:
                put(key, raw.lsn, b.will_init, bytes([value.WAL_RECORD]) + raw.data)
            tag = (b.spc, b.db, b.rel, b.forknum)
            if b.blkno + 1 > sizes.get(tag, 0):
                sizes[tag] = b.blkno + 1
                put(rel_size_key(*tag), raw.lsn, True, value.rel_size(b.blkno + 1))
        smgr = parse_smgr(rec) if raw.rmid == 2 else None
        if isinstance(smgr, SmgrTruncate):
            r = smgr.rel
            for fork, hit in ((0, smgr.truncates_heap), (1, smgr.truncates_fsm), (2, smgr.truncates_vm)):
                tag = (r.spc, r.db, r.rel, fork)
                if hit and tag in sizes:
                    sizes[tag] = smgr.blkno if fork == 0 else min(sizes[tag], smgr.blkno)
                    put(rel_size_key(*tag), raw.lsn, True, value.rel_size(sizes[tag]))
    return out


def layer_entries(store: LayerStore) -> dict[tuple[Key, int], tuple[bool, bytes]]:
    out = {}
    for d in store.map.layers.values():
        if d.kind == "delta":
            for key, lsn, wi, v in store.reader(d.name).iter_all():
                assert (key, lsn) not in out, "layers of one timeline never overlap in (key, LSN)"
                out[(key, lsn)] = (wi, v)
    return out


def ingest(sample, tmp_path, chunk: int) -> LayerStore:
    cfg = PageserverConfig(checkpoint_distance=256 << 10, compaction_threshold=1000, compaction_target_size=64 << 10)
    store = LayerStore(tmp_path, "0" * 32, sample.version, sample.start_lsn, cfg)
    pos, prev, end = sample.start_lsn, None, sample.end_lsn
    while pos < end:
        batch = scan_wal(sample.read(pos, min(chunk, end - pos)), pos, sample.seg_size, prev_lsn=prev)
        assert batch.error is None
        if not len(batch):
            if batch.at_zeros or chunk >= end - pos:
                break  # nothing complete before the end: the comparisons below say what is missing
            chunk *= 2
            continue
        store.put_batch(batch)
        prev, pos = int(batch.lsn[-1]), batch.end_lsn
        store.maybe_freeze()
        if batch.at_zeros:
            break
    store.maybe_freeze(force=True)
    return store


def test_fast_path_matches_reference_through_l0_and_compaction(wal_sample, tmp_path):
    ref = reference_entries(wal_sample)
    assert any(v[1][0] == value.FPI for v in ref.values()) and any(k.is_rel_size() for k, _ in ref)
    store = ingest(wal_sample, tmp_path, 300_000)
    assert len(store.map.l0()) >= 2
    assert layer_entries(store) == ref
    store.compact()
    assert not store.map.l0() and len([d for d in store.map.layers.values() if d.level == 1]) >= 2
    assert layer_entries(store) == ref
    # reads go newest-first to the first page-initialising version, same before and after
    some = [k for k, _ in list(ref)[:: max(1, len(ref) // 50)]]
    for key in some:
        vals, _ = store.get_values(key, wal_sample.end_lsn)
        assert vals and vals[0][0] == max(lsn for k, lsn in ref if k == key)
    store.close()


def test_open_layer_reads_match_frozen(wal_sample, tmp_path):
    ref = reference_entries(wal_sample)
    cfg = PageserverConfig(checkpoint_distance=1 << 40)
    store = LayerStore(tmp_path, "0" * 32, wal_sample.version, wal_sample.start_lsn, cfg)
    data = wal_sample.read(wal_sample.start_lsn, wal_sample.end_lsn - wal_sample.start_lsn)
    store.put_batch(scan_wal(data, wal_sample.start_lsn, wal_sample.seg_size))
    keys = sorted({k for k, _ in ref})[:: max(1, len(ref) // 40)]
    before = {k: store.get_values(k, wal_sample.end_lsn) for k in keys}
    assert {k.to_bytes() for k in store.open.keys()} == {k.to_bytes() for k, _ in ref}  # noqa: SIM118 - a layer
    store.freeze()
    assert {k: store.get_values(k, wal_sample.end_lsn) for k in keys} == before
    store.close()


def test_fpi_value_restores_its_page(wal_sample, tmp_path):
    ref = reference_entries(wal_sample)
    dec = WalStreamDecoder(wal_sample.start_lsn, wal_sample.seg_size)
    dec.feed(wal_sample.read(wal_sample.start_lsn, wal_sample.end_lsn - wal_sample.start_lsn))
    images = {}
    while (raw := dec.poll()) is not None:
        for b in decode_record(raw, wal_sample.version).blocks:
            if b.has_image and b.apply_image:
                images[(rel_block_key(b.spc, b.db, b.rel, b.forknum, b.blkno), raw.lsn)] = b.image
    fpis = [(k, e[1]) for k, e in ref.items() if e[1][0] == value.FPI]
    assert fpis
    for k, v in fpis:
        assert value.page_image(v) == images[k]


keys26 = st.lists(st.binary(min_size=26, max_size=26).map(lambda b: b"\0" + b[1:]), min_size=0, max_size=300,
                  unique=True)


@settings(max_examples=60, deadline=None)
@given(keys26, st.integers(0, 3))
def test_bulk_btree_equals_streaming(keys, shrink):
    keys = sorted(k[: 26 - shrink * 6] for k in set(keys))
    keys = sorted(set(keys))
    width = 26 - shrink * 6
    arr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), width)
    vals = np.arange(len(keys), dtype=np.uint64) * 977
    blocks: list[bytes] = []
    b = BTreeBuilder(width, blocks.append)
    for k, v in zip(keys, vals.tolist(), strict=True):
        b.append(k, v)
    _, nb = b.finish()
    data, root, nb2 = build_sorted(arr, vals)
    assert nb == nb2
    r = BTreeReader(lambda i: data[i * NODE_SIZE:(i + 1) * NODE_SIZE], root, width)
    assert list(r.iter_all()) == list(zip(keys, vals.tolist(), strict=True))
    k2, v2 = read_all_leaves(data, width)
    assert k2.tobytes() == arr.tobytes() and v2.tolist() == vals.tolist()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 40), st.integers(0, 2**40),
                          st.binary(max_size=300), st.booleans()), min_size=1, max_size=200))
def test_key_order_and_bulk_writer(tmp_path_factory, rows):
    """key_order sorts like bytes, stable; write_delta_layer writes exactly what DeltaLayerWriter writes."""
    rows = sorted(rows, key=lambda r: r[3])  # ingest order: ascending LSN (the precondition of key_order)
    ik = [Key(0, 1663, 5, 1 + r, f, b).to_bytes() + lsn.to_bytes(8, "big") for r, f, b, lsn, _, _ in rows]
    arr = np.frombuffer(b"".join(ik), dtype=np.uint8).reshape(len(ik), 26)
    order = key_order(arr).tolist()
    assert order == sorted(range(len(ik)), key=lambda i: ik[i][:18])
    vals = [r[4] for r in rows]
    src = np.frombuffer(b"".join(vals) or b"\0", dtype=np.uint8)
    lens = np.array([len(v) for v in vals], dtype=np.int64)
    e = DeltaEntries(arr, np.array([r[5] for r in rows]), src, np.concatenate([[0], np.cumsum(lens)[:-1]]),
                     lens, np.full(len(rows), value.WAL_RECORD, dtype=np.int16))
    s = sorted_entries(e)
    d = tmp_path_factory.mktemp("dl")
    lsns = s.lsns()
    info = write_delta_layer(d / "bulk", "0" * 32, s, MIN_KEY, MAX_KEY, int(lsns.min()), int(lsns.max()) + 1)
    with DeltaLayerWriter(d / "stream", "0" * 32, MIN_KEY, int(lsns.min())) as w:
        for i in range(len(s)):
            w.put(Key.from_bytes(s.ikeys[i, :18].tobytes()), int(lsns[i]), s.value(i), bool(s.will_init[i]))
        w.finish(MAX_KEY, int(lsns.max()) + 1)
    assert (d / "bulk").read_bytes() == (d / "stream").read_bytes()
    with DeltaLayerReader(info.path) as r:
        back = r.read_all()
        assert back.ikeys.tobytes() == s.ikeys.tobytes()
        assert [back.value(i) for i in range(len(back))] == [s.value(i) for i in range(len(s))]
