"""The coverage strategies' shared space: a bounded reservoir, the distance to what was asked."""

import numpy as np
import pytest

from service.selection.coverage import EmbeddingSpace, unit_rows


def test_the_reservoir_is_bounded_and_follows_the_recent_stream() -> None:
    rng = np.random.default_rng(0)
    space = EmbeddingSpace(reservoir=64, memory=8, horizon=640)
    for step in range(200):
        rows = unit_rows(rng.normal(size=(32, 4)) + np.array([step, 0, 0, 0]))
        space.commit(space.targets(rows, np.zeros(32)))
    assert space.size == 64 and space.seen == 200 * 32
    # a uniform sample of all 6400 frames would keep about 60 % from before frame 2560;
    # the horizon keeps the sample to the last ~640 frames or so
    old = (space.reservoir[:, 0] < unit_rows(np.array([[100.0, 2, 2, 2]]))[0, 0]).mean()
    assert old < 0.2
    assert space.scale is not None and space.scale > 0


def test_asking_for_a_frame_covers_its_neighbours_and_the_memory_is_bounded() -> None:
    space = EmbeddingSpace(reservoir=16, memory=2)
    rows = unit_rows(np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]]))
    targets = space.targets(rows, np.zeros(3))
    assert np.isinf(targets.dmin).all()  # nothing asked for yet
    space.select(targets, 0)
    assert targets.dmin[0] == pytest.approx(0.0)
    assert targets.dmin[1] < 0.02 < targets.dmin[2]
    space.commit(targets)
    later = space.targets(unit_rows(np.array([[0.98, 0.2]])), np.zeros(1))
    assert later.dmin[:3] == pytest.approx(targets.dmin)  # the reservoir kept its coverage
    assert later.dmin[3] < 0.1
    for row in unit_rows(np.eye(2)):
        space.remember(row)
    assert space.remembered == 2  # the oldest was forgotten


def test_rebase_starts_a_new_space_with_the_frames_asked_for() -> None:
    space = EmbeddingSpace(reservoir=8, memory=3)
    space.commit(space.targets(unit_rows(np.ones((5, 2))), np.zeros(5)))
    space.rebase(np.arange(10.0).reshape(5, 2) + 1)
    assert space.size == 0 and space.remembered == 3  # the latest three
    assert space.nearest_asked(unit_rows(np.array([[9.0, 10.0]])))[0] == pytest.approx(0.0)
    space.rebase(np.zeros((0, 2)))
    assert space.remembered == 0


def test_the_same_embeddings_again_keep_the_space() -> None:
    """A new head on the same backbone: the frames asked for embed as before, so the
    reservoir is kept; a changed backbone starts over."""
    rng = np.random.default_rng(3)
    space = EmbeddingSpace(reservoir=32, memory=4)
    asked = rng.normal(size=(6, 3))
    for row in unit_rows(asked):
        space.remember(row)  # the memory wraps: it holds the last four, oldest first
    space.commit(space.targets(unit_rows(rng.normal(size=(10, 3))), np.zeros(10)))
    space.rebase(asked)
    assert space.size == 10 and space.remembered == 4
    space.rebase(asked + 0.5)
    assert space.size == 0 and space.remembered == 4
