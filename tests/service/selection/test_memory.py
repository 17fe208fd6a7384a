"""The bounded row memory shared by the embedding strategies and the ``pal`` filter."""

import numpy as np
import pytest

from service.selection.memory import RowRing


def test_the_ring_keeps_the_latest_rows_oldest_first() -> None:
    ring = RowRing(3)
    assert len(ring) == 0 and ring.dim == 0 and ring.rows.shape == (0, 0)
    rows = np.arange(10.0).reshape(5, 2)
    for row in rows:
        ring.add(row)
    assert len(ring) == 3 and ring.dim == 2
    np.testing.assert_array_equal(ring.ordered(), rows[2:])
    assert sorted(map(tuple, ring.rows)) == sorted(map(tuple, rows[2:]))  # slot order
    smaller = ring.resized(2)
    np.testing.assert_array_equal(smaller.ordered(), rows[3:])
    larger = ring.resized(8)
    np.testing.assert_array_equal(larger.ordered(), rows[2:])


def test_a_row_is_copied_in_not_kept_as_a_view_of_its_batch() -> None:
    """A view would keep the whole batch of embeddings alive, and change with it."""
    batch = np.ones((32, 4))
    ring = RowRing(4)
    ring.add(batch[5])
    batch[5] = 7.0
    np.testing.assert_array_equal(ring.rows[0], np.ones(4))
    assert ring.rows.base is not batch and not np.shares_memory(ring.rows, batch)


def test_replace_clear_and_versions() -> None:
    ring = RowRing(2)
    seen = {ring.version}
    ring.replace(np.eye(3))
    np.testing.assert_array_equal(ring.ordered(), np.eye(3)[1:])
    assert ring.version not in seen
    seen.add(ring.version)
    ring.replace(np.empty((0, 0)))
    assert len(ring) == 0 and ring.dim == 0 and ring.version not in seen
    with pytest.raises(ValueError, match="at least one row"):
        RowRing(0)
    ring.add(np.ones(3))
    with pytest.raises(ValueError, match="a row of 2 values"):
        ring.add(np.ones(2))
