"""Stream TypiClust: typical frames of uncovered clusters; cluster centres, never outliers."""

import numpy as np
import pytest

from service.selection.filters import DecisionContext
from service.selection.policy import QueryPolicy
from service.selection.typiclust import typicality
from tests.service.selection.synthetic import centres, clusters


def test_typicality_is_the_inverse_mean_distance_to_the_k_nearest() -> None:
    # distances 1, 2 and 3 to three neighbours: K = 2 gives 1 / ((1 + 2) / 2)
    d2 = np.array([[np.inf, 1.0, 4.0, 9.0]])
    assert typicality(d2, 2)[0] == pytest.approx(1 / 1.5, rel=1e-6)


def test_typical_frames_are_asked_for_not_outliers() -> None:
    rng = np.random.default_rng(4)
    points, labels = clusters(rng, 3200, [0.5, 0.3, 0.2], outliers=0.1)
    policy = QueryPolicy(
        "typiclust", utility="margin", budget=0.03, window=200, seed=0, cold_start="none"
    )
    chosen: list[int] = []
    for start in range(0, 3200, 32):
        rows = policy.decide({"margin": np.zeros(32)}, DecisionContext(points[start : start + 32]))
        chosen += [start + i for i, row in enumerate(rows) if row["selected"]]
    picked = labels[chosen]
    assert len(chosen) >= 60
    assert sorted(picked[:3]) == [0, 1, 2]
    assert (picked == -1).mean() < 0.02  # 10 % of the stream are outliers
    # cluster members asked for sit nearer their centre than their cluster does on average
    members = labels >= 0
    offset = np.linalg.norm(points - centres(16, 3)[np.maximum(labels, 0)], axis=1)
    inliers = [i for i in chosen if labels[i] >= 0]
    assert offset[inliers].mean() < offset[members].mean()
