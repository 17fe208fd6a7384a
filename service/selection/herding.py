"""Kernel herding on a stream: MaxHerding, with uncertainty herding as the model gets competent.

MaxHerding (Bae, Noh and Sutherland, "Generalized coverage for more robust
low-budget active learning", ECCV 2024) greedily maximises the generalized
coverage of the data by the labeled set ``S``,

    GC(S) = (1/n) Σ_{i=1..n} max_{s∈S} k(x_i, s),

with a Gaussian kernel ``k(x, y) = exp(-||x - y||² / (2σ²))``. Uncertainty herding
(Bae, Oliveira and Sutherland, "Uncertainty herding: one active learning method
for all label budgets", ICLR 2025) weighs each point by its uncertainty ``U(x_i)``,

    UC(S) = (1/n) Σ_i U(x_i) max_{s∈S} k(x_i, s),

so that with few labels it covers the data (U nearly flat) and with more it
covers what the model is unsure of. The gain of a candidate ``c`` is

    Δ(c) = Σ_{i: x_i ≠ c} w_i [k(x_i, c) - max_{s∈S} k(x_i, s)]_+ / Σ_i w_i,
    w_i = (1 - λ) + λ U(x_i),

MaxHerding at λ = 0 and uncertainty herding at λ = 1. Here λ follows the model's
measured accuracy on the frames it asked about (``service.selection.competence``;
in the spirit of DCoM, Mishal and Weinshall 2024), and is 0 while the model has
learned from no label.

Stream form: the points ``x_i`` are the reservoir of the stream plus the batch
(:class:`~service.selection.coverage.EmbeddingSpace`), ``S`` the frames asked for;
``2σ² = β·h`` with ``h`` the reservoir's median squared distance (``bandwidth`` = β).
A frame is asked for when its gain passes the balanced quantile filter. The
candidate's own point is left out of its gain (``x_i ≠ c``): in a pool it adds 1/n,
but a stream never runs out of frames, and once the clusters are covered that
term alone would make outliers the best frames to ask for. A frame close to one
just asked for has almost no gain, so near-duplicates of a video burst are passed
over without a separate filter.

Per-frame cost: O((m + M)·D) for the distances (m reservoir rows, M remembered
frames, D the embedding size; one matrix product per batch) and O(m) for the gain (the
batch's gains in one pass, again after each frame asked for).
"""

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from service.selection.base import Param
from service.selection.coverage import CoverageStrategy, Targets

if TYPE_CHECKING:
    from service.selection.filters import DecisionContext


class KernelHerding(CoverageStrategy):
    """Stream MaxHerding / uncertainty herding (see the module docstring)."""

    name = "herding"
    reason = "herding"
    SPEC: ClassVar[dict[str, Param]] = {
        **CoverageStrategy.SPEC,
        "bandwidth": Param(0.25, 0.0, 100.0),
    }

    def __init__(self, budget: float, params: Mapping[str, float] | None = None) -> None:
        super().__init__(budget, params)
        self._kernel = np.empty((0, 0))
        self._weights = np.empty(0)
        self._scale = 1.0
        self._scores: np.ndarray | None = None  # the batch's gains, until a frame is selected

    def _prepare(self, targets: Targets, context: "DecisionContext") -> None:
        assert self.space is not None
        self._scale = self._values["bandwidth"] * self.space.batch_scale(targets)
        self._kernel = np.exp(-targets.d2 / self._scale)
        blend = self._blend
        self._weights = (1.0 - blend) + blend * np.clip(targets.utility, 0.0, 1.0)
        self._scores = None

    def score(self, index: int) -> float:
        # the uncertainty enters through the weights of the covered points, not the candidate
        targets = self._targets
        if targets is None:
            return 0.0
        return float(min(max(self._score(targets, index), 0.0), 1.0))

    def _score(self, targets: Targets, index: int) -> float:
        # Every frame's gain against the coverage as it stands, at once; the coverage changes
        # only when a frame is asked for (``record``), and then they are computed again.
        if self._scores is None:
            self._scores = self._gains(targets)
        return float(self._scores[index])

    def _gains(self, targets: Targets) -> np.ndarray:
        """The gain of each frame of the batch (rows of the kernel) given the coverage now."""
        covered = np.exp(-targets.dmin / self._scale)
        gain = np.maximum(self._kernel - covered, 0.0)
        # A stream has no end to its pool: once the clusters are covered, the largest gain
        # left would be an outlier covering itself. A frame's own point is left out, so the
        # gain is what it covers of the rest of the stream.
        batch = np.arange(len(gain))
        gain[batch, targets.offset + batch] = 0.0
        total = self._weights.sum()
        return gain @ self._weights / total if total > 0 else np.zeros(len(gain))

    def record(self, index: int, selected: bool) -> None:
        super().record(index, selected)
        if selected:
            self._scores = None  # the frame covers its neighbours now
