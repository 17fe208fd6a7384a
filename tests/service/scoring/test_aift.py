"""AIFT patch scores against hand-computed values, and the views the scorer makes."""

import math

import numpy as np
import pytest

from service.scoring.aift import ViewMaker, ViewSpec, aift_score, aift_terms, aift_utilities

LN2 = math.log(2)


def _h2(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p)) / LN2


# four views of one frame, two classes; the mean is (0.65, 0.35): class 0 dominates
VIEWS = np.array([[[0.9, 0.1], [0.3, 0.7], [0.8, 0.2], [0.6, 0.4]]])


def test_majority_selection_keeps_the_top_quarter_by_the_dominant_class() -> None:
    entropy, diversity = aift_terms(VIEWS, alpha=0.25, majority=True)
    # one view kept: (0.9, 0.1); one view has no pairs
    assert entropy[0] == pytest.approx(_h2(0.9))
    assert diversity[0] == 0.0


def test_majority_selection_with_half_the_views() -> None:
    entropy, diversity = aift_terms(VIEWS, alpha=0.5, majority=True)
    # kept: (0.9, 0.1) and (0.8, 0.2); d = 0.1 ln(0.9/0.8) + 0.1 ln(0.2/0.1)
    d = 0.1 * math.log(0.9 / 0.8) + 0.1 * math.log(2)
    assert d == pytest.approx(0.0810930, abs=1e-6)
    assert entropy[0] == pytest.approx((_h2(0.9) + _h2(0.8)) / 2)
    assert diversity[0] == pytest.approx(1 - math.exp(-d))


def test_without_majority_selection_every_view_counts() -> None:
    entropy, diversity = aift_terms(VIEWS, majority=False)
    views = [0.9, 0.3, 0.8, 0.6]
    assert entropy[0] == pytest.approx(sum(_h2(p) for p in views) / 4)
    pairs = [
        (a - b) * math.log(a / b) + ((1 - a) - (1 - b)) * math.log((1 - a) / (1 - b))
        for i, a in enumerate(views)
        for j, b in enumerate(views)
        if i != j
    ]
    assert diversity[0] == pytest.approx(1 - math.exp(-sum(pairs) / 12))
    # the noisy view (0.3, 0.7) makes the views disagree far more than the kept ones do
    assert diversity[0] > aift_terms(VIEWS, alpha=0.5)[1][0]


def test_variants_and_weights() -> None:
    entropy, diversity = aift_terms(VIEWS, alpha=0.5)
    both = aift_utilities(VIEWS, alpha=0.5)
    assert both["aift"][0] == pytest.approx((entropy[0] + diversity[0]) / 2)
    assert both["aift_entropy"][0] == pytest.approx(entropy[0])
    assert both["aift_diversity"][0] == pytest.approx(diversity[0])
    weighted = aift_score(VIEWS, lambda1=3.0, lambda2=1.0, alpha=0.5)
    assert weighted[0] == pytest.approx((3 * entropy[0] + diversity[0]) / 4)
    with pytest.raises(ValueError):
        aift_score(VIEWS, lambda1=0.0, lambda2=0.0)


def test_scores_are_in_range_for_many_classes() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(10, 0.2), size=(50, 12))
    for values in aift_utilities(p).values():
        assert values.shape == (50,)
        assert np.all((values >= 0) & (values <= 1))
    agree = np.repeat(np.eye(10)[None, :1], 12, axis=1)  # every view sure of class 0
    assert aift_utilities(agree)["aift"][0] == pytest.approx(0.0, abs=1e-5)


def test_views_keep_shape_and_the_first_is_the_frame() -> None:
    maker = ViewMaker(ViewSpec(count=6, seed=1))
    x = np.random.default_rng(0).normal(size=(3, 1, 16, 16)).astype(np.float32)
    views = maker(x)
    assert views.shape == (18, 1, 16, 16)
    np.testing.assert_array_equal(views[0::6], x)
    assert not np.allclose(views[1::6], x)  # the others are shifted, scaled or rotated
