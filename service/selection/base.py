"""What every query strategy shares: validated knobs, the budget, and the per-frame rule.

Two kinds of strategy stand behind the one engine :class:`~service.selection.policy.QueryPolicy`:

- threshold strategies (``service.selection.strategies``) compare one utility per
  frame with a threshold and need nothing else;
- embedding strategies (:class:`EmbeddingStrategy`: herding, ProbCover, TypiClust,
  VeSSAL) keep state in the model's embedding space. Per batch the policy calls
  :meth:`~EmbeddingStrategy.begin` with the batch's context, then, per frame and in
  stream order, :meth:`~EmbeddingStrategy.score` (the frame's utility now, after the
  frames before it in the batch were decided), ``decide`` and
  :meth:`~EmbeddingStrategy.record` (the final decision, audits included), then
  :meth:`~EmbeddingStrategy.end`. When the model serving changes,
  :meth:`~EmbeddingStrategy.rebase` moves their memory into the new embedding space.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    from service.selection.filters import DecisionContext


@dataclass(frozen=True)
class Param:
    """One knob of a strategy: its default and the range it must lie in."""

    default: float
    low: float
    high: float
    low_open: bool = True
    high_open: bool = False
    integer: bool = False

    def check(self, key: str, value: float) -> float:
        low_ok = value > self.low if self.low_open else value >= self.low
        high_ok = value < self.high if self.high_open else value <= self.high
        if not (low_ok and high_ok) or (self.integer and value != int(value)):
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            kind = "an integer" if self.integer else "a number"
            bounds = f"{left}{self.low}, {self.high}{right}"
            raise ValueError(f"param {key!r} must be {kind} in {bounds}, got {value}")
        return float(value)


class BaseStrategy:
    """Shared parameter handling; subclasses declare ``SPEC`` and the rule."""

    name: ClassVar[str]
    SPEC: ClassVar[dict[str, Param]] = {}
    threshold_settable: ClassVar[bool] = False

    def __init__(self, budget: float, params: Mapping[str, float] | None = None) -> None:
        self.budget = float(budget)
        self._values = {key: spec.default for key, spec in self.SPEC.items()}
        self.last_threshold: float | None = None
        self.set_params(params or {})

    @classmethod
    def check_params(cls, params: Mapping[str, float]) -> dict[str, float]:
        """Validated copy of ``params``; ValueError names unknown keys and bad values."""
        unknown = sorted(set(params) - set(cls.SPEC))
        if unknown:
            known = ", ".join(sorted(cls.SPEC)) or "none"
            raise ValueError(f"unknown params {unknown} for policy {cls.name!r} (known: {known})")
        return {key: cls.SPEC[key].check(key, value) for key, value in params.items()}

    def decide(
        self, utility: float, budget_ok: bool, rng: np.random.Generator
    ) -> tuple[bool, str | None]:
        raise NotImplementedError

    def params(self) -> dict[str, float]:
        return dict(self._values)

    def set_params(self, params: Mapping[str, float]) -> None:
        self._values.update(self.check_params(params))
        self._apply_params()

    def _apply_params(self) -> None:
        """Hook: copy knobs into fast attributes."""

    def set_budget(self, budget: float) -> None:
        self.budget = float(budget)

    @property
    def threshold(self) -> float | None:
        return None

    def set_threshold(self, value: float) -> None:
        raise ValueError(f"policy {self.name!r} has no threshold that can be set")


class EmbeddingStrategy(BaseStrategy):
    """A strategy that decides from the frames' embeddings and keeps state between batches.

    ``blend`` (in [0, 1]) is the weight of the uncertainty utility against coverage: 0
    while the model has learned nothing, then following its measured accuracy
    (``service.selection.competence``). ``memory`` is how many frames asked for it
    remembers (the scorer keeps as many inputs to re-embed on a model swap).
    """

    memory: int = 0

    def begin(self, utilities: np.ndarray, context: "DecisionContext | None", blend: float) -> None:
        """Prepares one batch (vectorised work: distances, kernels, projections)."""
        raise NotImplementedError

    def score(self, index: int) -> float:
        """The utility in [0, 1] of frame ``index`` of the batch, given the decisions so far."""
        raise NotImplementedError

    def record(self, index: int, selected: bool) -> None:
        """The final decision on frame ``index`` (after filters and audits)."""
        raise NotImplementedError

    def end(self) -> None:
        """Ends the batch: the frames join the strategy's picture of the stream."""
        raise NotImplementedError

    def rebase(self, embeddings: np.ndarray, probabilities: np.ndarray | None) -> None:
        """A new model serves: ``embeddings`` (and ``probabilities``) are the frames asked
        for so far (the most recent ``memory`` of them, oldest first) under that model."""
        raise NotImplementedError
