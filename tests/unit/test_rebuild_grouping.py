"""The rebuild's one-pass grouping of sorted rows agrees with np.unique, sorted or not."""

from __future__ import annotations

import numpy as np

from neonctl.engine.pageserver.images.image_manifest import group_rows


def _check(tags: np.ndarray) -> None:
    uniq, inverse = group_rows(tags)
    want_u, want_inv = np.unique(tags, axis=0, return_inverse=True)
    assert np.array_equal(uniq, want_u)
    assert np.array_equal(inverse, want_inv.ravel())
    assert np.array_equal(uniq[inverse], tags)


def test_sorted_rows_group_in_one_pass():
    rng = np.random.default_rng(5)
    tags = rng.integers(0, 4, size=(5000, 5)).astype(np.uint32)
    _check(tags[np.lexsort(tags.T[::-1])])


def test_unsorted_rows_fall_back():
    rng = np.random.default_rng(6)
    _check(rng.integers(0, 3, size=(3000, 5)).astype(np.uint32))
    _check(np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=np.uint32))


def test_empty_and_single():
    _check(np.zeros((1, 5), dtype=np.uint32))
    u, inv = group_rows(np.zeros((0, 5), dtype=np.uint32))
    assert len(u) == 0 and len(inv) == 0
