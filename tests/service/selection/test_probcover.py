"""Stream ProbCover: the purity radius, and balls that cover the stream."""

import numpy as np

from service.selection.coverage import squared_distances, unit_rows
from service.selection.filters import DecisionContext
from service.selection.policy import QueryPolicy
from service.selection.probcover import kmeans_labels, pure_radius
from tests.service.selection.synthetic import clusters


def test_the_radius_is_the_largest_whose_balls_stay_pure() -> None:
    rng = np.random.default_rng(5)
    points, labels = clusters(rng, 300, [0.5, 0.5], spread=0.5)
    rows = unit_rows(points)
    found = kmeans_labels(rows, 2, rng)
    assert max(np.mean(found == labels), np.mean(found != labels)) > 0.95
    d2 = squared_distances(rows, rows)
    radius = pure_radius(d2, found, 0.95)
    within = d2[labels[:, None] == labels[None, :]]
    across = d2[labels[:, None] != labels[None, :]]
    assert np.median(within) < radius < across.min()


def test_balls_cover_every_cluster_and_outliers_score_nothing() -> None:
    rng = np.random.default_rng(6)
    points, labels = clusters(rng, 1600, [0.55, 0.25, 0.1, 0.1], outliers=0.05)
    policy = QueryPolicy(
        "probcover", utility="margin", budget=0.05, window=200, seed=0, cold_start="none"
    )
    chosen, outlier_scores = [], []
    for start in range(0, 1600, 32):
        rows = policy.decide({"margin": np.zeros(32)}, DecisionContext(points[start : start + 32]))
        chosen += [start + i for i, row in enumerate(rows) if row["selected"]]
        if start >= 800:
            outlier_scores += [
                row["utility"] for i, row in enumerate(rows) if labels[start + i] == -1
            ]
    assert sorted(labels[chosen][:4]) == [0, 1, 2, 3]
    assert np.mean(outlier_scores) < 0.01
