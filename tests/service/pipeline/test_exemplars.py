"""Exemplars: the inputs of the latest frames asked for, bounded, for a new model to re-embed."""

import numpy as np

from service.pipeline.exemplars import Exemplars


def test_the_latest_inputs_are_kept_in_order_within_the_capacity() -> None:
    kept = Exemplars(3)
    kept.add(np.arange(2 * 4, dtype=np.float32).reshape(2, 1, 2, 2))
    kept.add(np.full((2, 1, 2, 2), 9.0, dtype=np.float32))
    stacked = kept.stacked((1, 2, 2))
    assert stacked is not None and stacked.dtype == np.float32 and len(kept) == 3
    assert stacked[0, 0, 0, 0] == 4.0 and (stacked[1:] == 9.0).all()  # the oldest went
    kept.resize(1)
    assert len(kept) == 1 and kept.capacity == 1


def test_inputs_of_another_size_are_dropped_and_no_capacity_keeps_nothing() -> None:
    kept = Exemplars(4)
    kept.add(np.zeros((2, 1, 2, 2)))
    assert kept.stacked((3, 8, 8)) is None and len(kept) == 0
    none = Exemplars(0)
    none.add(np.zeros((2, 1, 2, 2)))
    assert len(none) == 0 and none.stacked((1, 2, 2)) is None
