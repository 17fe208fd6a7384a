"""ProbCover on a stream: ask for the frames whose δ-ball covers most of what is uncovered.

ProbCover (Yehuda, Dekel, Hacohen and Weinshall, "Active learning through a
covering lens", NeurIPS 2022) maximises the probability coverage

    P(⋃_{s∈S} B_δ(s)),  B_δ(x) = {x' : ||x' - x|| <= δ},

greedily: it takes the point whose ball holds the most points not yet covered.
δ is the largest radius whose balls are pure with probability at least α = 0.95,
purity judged against a k-means clustering of the embeddings into as many
clusters as classes.

Stream form, with the reservoir of the stream plus the batch as the points
(:class:`~service.selection.coverage.EmbeddingSpace`) and the frames asked for as
``S``: a frame's score is the share of the points within δ of it that no frame asked
for covers. δ is chosen on the reservoir each time its scale is refreshed: k-means
(C clusters, C the model's classes) on the reservoir, then the largest of a ladder
of radii (quantiles of the reservoir's distances) whose balls are pure for a share α
of the rows.

Per-frame cost: O((m + M)·D) for the distances (one matrix product per batch) and
O(m) for the ball; the radius, O(m²·D + 10·m·C·D), only when the reservoir is refreshed.
A frame's ball is counted without the frame itself, so an outlier scores nothing
(a stream never runs out of frames to cover).
"""

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from service.selection.base import Param
from service.selection.coverage import CoverageStrategy, Targets, squared_distances

if TYPE_CHECKING:
    from service.selection.filters import DecisionContext

_RADIUS_QUANTILES = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3)
_KMEANS_STEPS = 10
_SMALL_RESERVOIR = 64  # below this the radius is chosen again every batch, the batch included


def kmeans_labels(rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Cluster of each row after a few Lloyd steps from k-means++ seeds (rows are unit vectors)."""
    n = len(rows)
    k = max(1, min(k, n))
    centres = [rows[int(rng.integers(n))]]
    closest = ((rows - centres[0]) ** 2).sum(axis=1)
    while len(centres) < k:
        total = closest.sum()
        pick = int(rng.choice(n, p=closest / total)) if total > 0 else int(rng.integers(n))
        centres.append(rows[pick])
        closest = np.minimum(closest, ((rows - rows[pick]) ** 2).sum(axis=1))
    centre = np.stack(centres)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(_KMEANS_STEPS):
        labels = (rows @ centre.T * 2.0 - (centre**2).sum(axis=1)).argmax(axis=1)
        for j in range(k):
            members = rows[labels == j]
            if len(members):
                centre[j] = members.mean(axis=0)
    return labels


def pure_radius(d2: np.ndarray, labels: np.ndarray, alpha: float) -> float:
    """The largest squared radius of the ladder whose balls are pure for a share ``alpha``."""
    upper = d2[np.triu_indices(len(d2), k=1)]
    candidates = np.quantile(upper, _RADIUS_QUANTILES) if upper.size else np.array([1.0])
    chosen = float(candidates[0])
    same = labels[:, None] == labels[None, :]
    for radius in candidates:
        inside = d2 <= radius
        pure = np.all(same | ~inside, axis=1).mean()
        if pure < alpha:
            break
        chosen = float(radius)
    return chosen


class StreamProbCover(CoverageStrategy):
    """Stream ProbCover (see the module docstring); ``alpha`` is the paper's purity threshold."""

    name = "probcover"
    reason = "coverage"
    SPEC: ClassVar[dict[str, Param]] = {
        **CoverageStrategy.SPEC,
        "alpha": Param(0.95, 0.0, 1.0),
    }

    def __init__(self, budget: float, params: Mapping[str, float] | None = None) -> None:
        super().__init__(budget, params)
        self._radius: float | None = None
        self._radius_version = -1
        self._rng = np.random.default_rng(0)

    def rebase(self, embeddings: np.ndarray, probabilities: np.ndarray | None) -> None:
        super().rebase(embeddings, probabilities)
        self._radius, self._radius_version = None, -1

    def _prepare(self, targets: Targets, context: "DecisionContext") -> None:
        space = self.space
        assert space is not None
        rows = None
        if space.size < _SMALL_RESERVOIR:  # too few rows: the batch joins them
            rows = np.vstack([space.reservoir, targets.rows]) if space.size else targets.rows
        elif space.version != self._radius_version:
            rows = space.reservoir
        if rows is not None:
            classes = 2 if context.probabilities is None else context.probabilities.shape[1]
            labels = kmeans_labels(rows, max(2, classes), self._rng)
            d2 = squared_distances(rows, rows)
            self._radius = pure_radius(d2, labels, self._values["alpha"])
            self._radius_version = space.version

    def _score(self, targets: Targets, index: int) -> float:
        radius = self._radius if self._radius is not None else 0.0
        inside = targets.d2[index] <= radius
        inside[targets.offset + index] = False  # not itself: see herding on outliers
        uncovered = targets.dmin > radius
        return float(np.count_nonzero(inside & uncovered) / targets.n)
