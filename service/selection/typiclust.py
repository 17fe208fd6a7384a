"""TypiClust on a stream: ask for typical frames of regions no frame asked for covers.

TypiClust (Hacohen, Dekel and Weinshall, "Active learning on a budget: opposite
strategies suit high and low budgets", ICML 2022) clusters the embeddings into
``|L| + B`` clusters and, from each of the largest clusters holding no labeled
point, takes the most typical point,

    Typicality(x) = ( (1/K) Σ_{x_i ∈ K-NN(x)} ||x - x_i||₂ )^{-1},  K = 20.

Stream form, against the reservoir of the stream plus the batch
(:class:`~service.selection.coverage.EmbeddingSpace`) as the points and the frames
asked for as ``L``: a frame's score is the share of reservoir rows that are less
typical than it (its typicality percentile) times how uncovered its cluster is,
``min(1, d(x, S) / r_k(x))``, where ``r_k(x)`` is the distance to its k-th nearest
point with ``k = max(K, n / (|S| + 1))``, the size of one of ``|S| + 1`` equal
clusters of the ``n`` points: the more frames were asked for, the smaller the
clusters, as in the paper. Outliers are never typical; cluster centres are.

Per-frame cost: O((m + M)·D) for the distances (one matrix product per batch) and
O(m) for the neighbours; the reservoir's typicalities, O(m²·D), are recomputed
only when the reservoir's scale is (``EmbeddingSpace`` refreshes).
"""

from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from service.selection.base import Param
from service.selection.coverage import CoverageStrategy, Targets

_EPS = 1e-12
_SMALL_RESERVOIR = 64  # below this the reference typicalities are recomputed every batch


def typicality(d2: np.ndarray, k: int) -> np.ndarray:
    """TypiClust's typicality of each row of squared distances ``d2`` (self excluded: inf)."""
    k = max(1, min(k, d2.shape[1]))
    nearest = np.sqrt(np.partition(d2, k - 1, axis=1)[:, :k])
    return 1.0 / (nearest.mean(axis=1) + _EPS)


class StreamTypiClust(CoverageStrategy):
    """Stream TypiClust (see the module docstring); ``k`` is the paper's K."""

    name = "typiclust"
    reason = "typicality"
    SPEC: ClassVar[dict[str, Param]] = {
        **CoverageStrategy.SPEC,
        "k": Param(20.0, 1.0, 1000.0, low_open=False, integer=True),
    }

    def __init__(self, budget: float, params: Mapping[str, float] | None = None) -> None:
        super().__init__(budget, params)
        self._reference = np.empty(0)  # the reservoir's typicalities, sorted
        self._reference_version = -1

    def _prepare(self, targets: Targets, context: object) -> None:
        space = self.space
        assert space is not None
        if space.version != self._reference_version or space.size < _SMALL_RESERVOIR:
            k = int(self._values["k"])
            if space.size >= 2:
                d2 = space.reservoir_distances()
            else:  # nothing in the reservoir yet: the batch is the reference
                d2 = targets.d2[:, targets.offset :].copy()
            np.fill_diagonal(d2, np.inf)
            self._reference = np.sort(typicality(d2, k))
            self._reference_version = space.version

    def _score(self, targets: Targets, index: int) -> float:
        assert self.space is not None
        row = targets.d2[index].copy()
        row[targets.offset + index] = np.inf  # not its own neighbour
        n = targets.n - 1
        if n < 1:
            return 1.0
        k = int(self._values["k"])
        own = typicality(row[None, :], k)[0]
        percentile = np.searchsorted(self._reference, own) / max(1, len(self._reference))
        cluster = max(k, int(np.ceil(n / (self.space.remembered + 1))))
        radius = np.sqrt(np.partition(row, min(cluster, n) - 1)[min(cluster, n) - 1])
        nearest_asked = np.sqrt(targets.dmin[targets.offset + index])
        uncovered = 1.0 if radius <= 0 else min(1.0, nearest_asked / radius)
        return float(percentile * uncovered)
