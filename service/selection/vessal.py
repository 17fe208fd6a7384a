"""VeSSAL: streaming volume sampling on gradient embeddings, at a rate that keeps the budget.

Saran, Yousefi, Krishnamurthy, Langford and Ash, "Streaming active learning with
deep neural networks", ICML 2023. Each frame's gradient embedding is BADGE's
``g = (p - onehot(ŷ)) ⊗ e`` (``service.selection.diversity.gradient_embeddings``).
With ``A`` the sum of ``g gᵀ`` over the frames asked for (plus a small ridge λI)
and ``Σ̂`` the running covariance of every gradient embedding seen,

    Σ̂_t = ((t - 1)/t) Σ̂_{t-1} + (1/t) g_t g_tᵀ,
    p_t = min(1, ζ_t · g_tᵀ A⁻¹ g_t),  ζ_t = b / tr(Σ̂_t A⁻¹),

the frame is asked for with probability ``p_t`` and then ``A ← A + g_t g_tᵀ``
(Sherman-Morrison on ``A⁻¹``). ``E[p_t] = ζ_t tr(Σ̂_t A⁻¹) = b``: the rate keeps the
budget ``b`` while frames whose gradients point in directions the asked-for frames
do not span are the likeliest to be asked for.

With ``horizon`` H > 0, ``Σ̂`` and the running ``tr(Σ̂A⁻¹)`` weigh frame t by
``1/min(t, H)`` instead of ``1/t``: the running mean until H frames, then an exponential
average over about the last H frames. The paper's mean of every frame since the model
changed (H = 0, the default) falls behind when the gradients shrink as the model learns:
in ``winnow bench label-efficiency`` on digits VeSSAL asked for 1.5 to 2 % of the frames
it saw against a budget of 5 %.

The rate is cut at 1, and a frame whose gradient leaves the span of those asked for has a
leverage many times the mean: such frames are asked for with certainty and the rest
seldom, which can spend well under the budget (on digits, even with a horizon). With
``keep_budget`` 1 the rate is multiplied by a gain that follows what is spent: after each
frame the budget allowed, ``gain ← gain · exp(η (b − asked)/b)`` (η = 0.01, gain within
[0.01, 100]), so the share asked for settles at ``b`` while the order of the frames by
leverage stays VeSSAL's. Off (0) by default, as in the paper.

Gradient embeddings of C classes and D features have C·D entries; above ``dim``
they are projected to ``dim`` by a fixed Gaussian random projection (Johnson and
Lindenstrauss), as the paper's code does for wide models. The ridge is ``λ =
ridge · tr(Σ̂)/d`` from the first batch, so it scales with the embeddings.

Per-frame cost: O(d²) with ``d = min(C·D, dim)`` (one matrix-vector product with
``A⁻¹``; per batch one (B, C·D)·(C·D, d) projection), and O(B·d²) per frame asked for.
Memory O(d²).
"""

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from service.selection.base import EmbeddingStrategy, Param
from service.selection.diversity import gradient_embeddings
from service.selection.strategies import RANDOM

if TYPE_CHECKING:
    from service.selection.filters import DecisionContext

VOLUME = "volume"


class VeSSAL(EmbeddingStrategy):
    """Streaming volume sampling (see the module docstring)."""

    name = "vessal"
    SPEC: ClassVar[dict[str, Param]] = {
        "dim": Param(256.0, 1.0, 4096.0, low_open=False, integer=True),
        "ridge": Param(0.01, 0.0, 1e6),
        "memory": Param(256.0, 1.0, 65536.0, low_open=False, integer=True),
        "horizon": Param(0.0, 0.0, 1e9, low_open=False, integer=True),
        "keep_budget": Param(0.0, 0.0, 1.0, low_open=False, integer=True),
    }
    GAIN_RATE: ClassVar[float] = 0.01
    GAIN_RANGE: ClassVar[tuple[float, float]] = (0.01, 100.0)

    def __init__(self, budget: float, params: Mapping[str, float] | None = None) -> None:
        super().__init__(budget, params)
        self._projection: np.ndarray | None = None
        self._gain = 1.0  # keep_budget's; kept across backbones (the leverages' shape stays)
        self._allowed = False
        self._reset()

    def _apply_params(self) -> None:
        self.memory = int(self._values["memory"])
        self.horizon = int(self._values["horizon"])
        self.keep_budget = bool(self._values["keep_budget"])

    def _weight(self, t: int) -> float:
        """Frame t's weight in the running averages: ``1/t``, or ``1/min(t, horizon)``."""
        return 1.0 / (min(t, self.horizon) if self.horizon else t)

    def _covariance_after(self, rows: np.ndarray) -> np.ndarray:
        """``Σ̂`` once ``rows`` (the batch's first frames) joined it, frame by frame:
        ``Σ̂ ← (1 - w_t) Σ̂ + w_t g gᵀ``, summed in closed form."""
        assert self._covariance is not None
        weights = np.array([self._weight(self._seen + i + 1) for i in range(len(rows))])
        keep = np.cumprod((1.0 - weights)[::-1])[::-1]  # ∏_{j >= i} (1 - w_j)
        after = np.append(keep[1:], 1.0)  # ∏_{j > i} (1 - w_j)
        decay = float(keep[0]) if len(rows) else 1.0
        return decay * self._covariance + (rows.T * (weights * after)) @ rows

    def _reset(self) -> None:
        self._inverse: np.ndarray | None = None  # A⁻¹
        self._covariance: np.ndarray | None = None  # Σ̂ up to the current batch
        self._seen = 0  # t before the current batch
        self._trace = 0.0  # tr(Σ̂_t A⁻¹), kept up to date frame by frame
        self._g = np.empty((0, 0))
        self._ag = np.empty((0, 0))
        self._probabilities: np.ndarray | None = None
        self._fallback = False
        self._batch_seen = 0

    @property
    def threshold(self) -> float | None:
        return self.last_threshold

    def _gradients(self, probabilities: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        g = gradient_embeddings(probabilities, embeddings)
        dim = int(self._values["dim"])
        if g.shape[1] <= dim:
            return g
        if self._projection is None or self._projection.shape[0] != g.shape[1]:
            rng = np.random.default_rng(g.shape[1])  # the same projection for the same width
            self._projection = rng.normal(0.0, 1.0 / np.sqrt(dim), (g.shape[1], dim))
        return g @ self._projection

    def _start(self, g: np.ndarray) -> None:
        d = g.shape[1]
        scale = float((g**2).sum(axis=1).mean()) / d if len(g) else 1.0
        ridge = self._values["ridge"] * (scale if scale > 0 else 1.0)
        self._inverse = np.eye(d) / max(ridge, 1e-12)
        self._covariance = np.zeros((d, d))

    def begin(self, utilities: np.ndarray, context: "DecisionContext | None", blend: float) -> None:
        self._fallback = context is None or context.embeddings is None
        if self._fallback or context is None or context.probabilities is None:
            self._fallback = True
            return
        assert context.embeddings is not None
        g = self._gradients(np.asarray(context.probabilities), np.asarray(context.embeddings))
        if self._inverse is None or self._inverse.shape[0] != g.shape[1]:
            self._start(g)
        assert self._inverse is not None
        self._g, self._ag = g, g @ self._inverse
        self._batch_seen = 0

    def score(self, index: int) -> float:
        if self._fallback:
            return 0.0
        g, ag = self._g[index], self._ag[index]
        leverage = float(g @ ag)
        t = self._seen + self._batch_seen + 1
        self._batch_seen += 1
        self._trace += (leverage - self._trace) * self._weight(t)
        if self._trace <= 0:
            return 1.0
        gain = self._gain if self.keep_budget else 1.0
        return float(min(1.0, gain * self.budget * leverage / self._trace))

    def decide(
        self, utility: float, budget_ok: bool, rng: np.random.Generator
    ) -> tuple[bool, str | None]:
        if self._fallback:
            self.last_threshold = None
            return (True, RANDOM) if budget_ok and rng.random() <= self.budget else (False, None)
        self.last_threshold = None  # a probability, not a threshold
        self._allowed = budget_ok
        if budget_ok and rng.random() < utility:
            return True, VOLUME
        return False, None

    def record(self, index: int, selected: bool) -> None:
        if self.keep_budget and self._allowed and not self._fallback:
            step = math.exp(self.GAIN_RATE * (self.budget - float(selected)) / self.budget)
            low, high = self.GAIN_RANGE
            self._gain = float(min(high, max(low, self._gain * step)))
        if not selected or self._fallback or self._inverse is None:
            return
        ag = self._ag[index]
        leverage = float(self._g[index] @ ag)
        self._inverse -= np.outer(ag, ag) / (1.0 + leverage)
        self._ag = self._g @ self._inverse
        # Σ̂ up to this frame: the batch's frames so far join the running covariance
        covariance = self._covariance_after(self._g[: self._batch_seen])
        self._trace = float((covariance * self._inverse).sum())

    def end(self) -> None:
        if self._fallback or self._covariance is None:
            return
        self._covariance = self._covariance_after(self._g[: self._batch_seen])
        self._seen += self._batch_seen

    def rebase(self, embeddings: np.ndarray, probabilities: np.ndarray | None) -> None:
        """A new model: ``A`` is rebuilt from the frames asked for, ``Σ̂`` starts over."""
        self._reset()
        if probabilities is None or not len(embeddings):
            return
        g = self._gradients(np.asarray(probabilities), np.asarray(embeddings))
        self._start(g)
        d = g.shape[1]
        ridge = 1.0 / float(self._inverse[0, 0]) if self._inverse is not None else 1.0
        self._inverse = np.linalg.inv(ridge * np.eye(d) + g.T @ g)
