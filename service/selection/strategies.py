"""Threshold strategies of the query decision, one small class each.

The strategies follow Žliobaitė, Bifet, Pfahringer and Holmes, "Active learning
with drifting streaming data", IEEE TNNLS 25(1), 2014 (fixed, variable,
randomized-variable and split uncertainty), plus the balanced incremental
quantile filter of Kottke, Krempl and Spiliopoulou, "Probabilistic active
learning in datastreams", IDA 2015, and the random baseline. Rules and default
parameters match scikit-activeml's stream budget managers.

Certainty scale. The paper compares the maximum posterior ``max_k p_k`` with a
threshold θ. Here every strategy sees one utility ``u`` in [0, 1] (1 = most
informative) and works on the certainty ``c = 1 - u``, as scikit-activeml
does. With the normalized least-confidence utility this is
``c = (max_k p_k - 1/C) / (1 - 1/C)``, the paper's maximum posterior rescaled
from [1/C, 1] to [0, 1]; the rules (``query if c < θ``, ``θ ← θ(1 ∓ s)``) are
applied to ``c`` exactly as written, for any utility. On the utility scale a
threshold θ reads ``1 - θ`` (``query if u > 1 - θ``), which is what
``threshold`` reports.

Budget. The paper's estimated spending ``û/w < b`` is replaced by an exact
:class:`~service.selection.budget.SlidingBudget` (and :class:`~service.selection.budget.HourlyCap`):
strategies get ``budget_ok`` and never select without it, and, as in the
paper, adapt their threshold only on frames where the budget allowed a query.
"""

import bisect
from collections import deque
from collections.abc import Mapping
from typing import ClassVar, Protocol

import numpy as np

from service.selection.base import BaseStrategy as _Strategy
from service.selection.base import Param as _Param

UNCERTAINTY = "uncertainty"
RANDOM = "random"

THETA_MIN = 1e-6
"""Floor of the variable threshold θ: repeated ``θ(1-s)`` would underflow to 0 and lock."""
THETA_MAX = 1.0
"""Ceiling of θ: every ``c < 1`` already qualifies at 1; the paper's unbounded growth over a
run of certain frames would otherwise overflow or take hundreds of queries to come back."""


class ThresholdStrategy(Protocol):
    """One query strategy; the engine :class:`QueryPolicy` calls it frame by frame."""

    @property
    def name(self) -> str: ...

    last_threshold: float | None
    """The threshold (utility scale) the last decide() compared against, or None."""

    def decide(
        self, utility: float, budget_ok: bool, rng: np.random.Generator
    ) -> tuple[bool, str | None]:
        """Whether to query this frame and why ("uncertainty" or "random"); never without budget."""
        ...

    @property
    def threshold(self) -> float | None:
        """The current threshold on the utility scale, or None where there is none."""
        ...

    def params(self) -> dict[str, float]: ...

    def set_params(self, params: Mapping[str, float]) -> None: ...

    def set_threshold(self, value: float) -> None: ...

    def set_budget(self, budget: float) -> None: ...


_THETA = _Param(1.0, 0.0, 1.0)  # scikit-activeml: theta=1.0, on the certainty scale
_STEP = _Param(0.01, 0.0, 1.0)  # scikit-activeml: s=0.01


class FixedUncertainty(_Strategy):
    """Fixed uncertainty (Žliobaitė et al. 2014, Alg. 1), threshold derived from the budget.

    The paper queries when ``max_k p_k <= θ`` with ``θ = 1/C + b (1 - 1/C)``
    (as scikit-activeml's FixedUncertaintyBudgetManager). On the certainty scale
    ``c = (max_k p_k - 1/C)/(1 - 1/C)`` this is exactly ``c <= b``, i.e.
    ``u >= 1 - b``; the same rule is applied to any utility. ``set_threshold``
    overrides it until the budget changes.
    """

    name = "fixed"
    threshold_settable = True

    def __init__(self, budget: float, params: Mapping[str, float] | None = None) -> None:
        super().__init__(budget, params)
        self._theta = self.budget

    def decide(
        self, utility: float, budget_ok: bool, rng: np.random.Generator
    ) -> tuple[bool, str | None]:
        self.last_threshold = 1.0 - self._theta
        if budget_ok and 1.0 - utility <= self._theta:
            return True, UNCERTAINTY
        return False, None

    @property
    def threshold(self) -> float:
        return 1.0 - self._theta

    def set_threshold(self, value: float) -> None:
        self._theta = 1.0 - value

    def set_budget(self, budget: float) -> None:
        super().set_budget(budget)
        self._theta = self.budget


class VariableUncertainty(_Strategy):
    """Variable uncertainty (Žliobaitė et al. 2014, Alg. 2, VarUncertainty).

    While the budget allows a query: if ``c < θ`` query and ``θ ← θ(1 - s)``,
    else ``θ ← θ(1 + s)``; with no budget θ stays. Defaults as
    scikit-activeml's VariableUncertaintyBudgetManager: ``theta=1.0``,
    ``s=0.01``. θ is kept in [THETA_MIN, THETA_MAX] (see there).
    """

    name = "variable"
    SPEC: ClassVar[dict[str, _Param]] = {"theta": _THETA, "s": _STEP}
    threshold_settable = True

    def __init__(self, budget: float, params: Mapping[str, float] | None = None) -> None:
        super().__init__(budget, params)
        self._theta = min(max(self._values["theta"], THETA_MIN), THETA_MAX)

    def _apply_params(self) -> None:
        self._down = 1.0 - self._values["s"]
        self._up = 1.0 + self._values["s"]

    def set_params(self, params: Mapping[str, float]) -> None:
        super().set_params(params)
        if "theta" in params:  # a live change of the initial θ moves the live one too
            self._theta = min(max(self._values["theta"], THETA_MIN), THETA_MAX)

    def _uncertainty_rule(self, certainty: float, theta: float) -> bool:
        """Compares with ``theta`` and moves θ as the paper says; returns whether to query."""
        if certainty < theta:
            self._theta = max(self._theta * self._down, THETA_MIN)
            return True
        self._theta = min(self._theta * self._up, THETA_MAX)
        return False

    def decide(
        self, utility: float, budget_ok: bool, rng: np.random.Generator
    ) -> tuple[bool, str | None]:
        theta = self._theta
        self.last_threshold = 1.0 - theta
        if budget_ok and self._uncertainty_rule(1.0 - utility, theta):
            return True, UNCERTAINTY
        return False, None

    @property
    def threshold(self) -> float:
        return 1.0 - self._theta

    def set_threshold(self, value: float) -> None:
        self._theta = min(max(1.0 - value, THETA_MIN), THETA_MAX)


class RandomizedVariableUncertainty(VariableUncertainty):
    """Variable uncertainty with randomization (Žliobaitė et al. 2014, Alg. 3, RanVarUncertainty).

    While the budget allows a query: draw ``η ~ N(1, δ)`` and compare with the
    randomized threshold: if ``c < θη`` query and ``θ ← θ(1 - s)``, else
    ``θ ← θ(1 + s)``. Defaults as scikit-activeml's
    RandomVariableUncertaintyBudgetManager: ``theta=1.0``, ``s=0.01``,
    ``delta=1.0`` (δ is the standard deviation of η).
    """

    name = "randomized-variable"
    SPEC: ClassVar[dict[str, _Param]] = {
        "theta": _THETA,
        "s": _STEP,
        "delta": _Param(1.0, 0.0, float("inf")),
    }

    def decide(
        self, utility: float, budget_ok: bool, rng: np.random.Generator
    ) -> tuple[bool, str | None]:
        if not budget_ok:
            self.last_threshold = 1.0 - self._theta
            return False, None
        randomized = self._theta * rng.normal(1.0, self._values["delta"])
        self.last_threshold = 1.0 - randomized
        if self._uncertainty_rule(1.0 - utility, randomized):
            return True, UNCERTAINTY
        return False, None


class SplitUncertainty(VariableUncertainty):
    """Split strategy (Žliobaitė et al. 2014, Alg. 4, Split).

    While the budget allows a query: with probability ``v`` act as the random
    strategy (query with probability ``b``, θ untouched), otherwise as variable
    uncertainty. Defaults as scikit-activeml's SplitBudgetManager: ``v=0.1``,
    ``theta=1.0``, ``s=0.01``.
    """

    name = "split"
    SPEC: ClassVar[dict[str, _Param]] = {
        "theta": _THETA,
        "s": _STEP,
        "v": _Param(0.1, 0.0, 1.0, high_open=True),
    }

    def decide(
        self, utility: float, budget_ok: bool, rng: np.random.Generator
    ) -> tuple[bool, str | None]:
        if not budget_ok:
            self.last_threshold = 1.0 - self._theta
            return False, None
        if rng.random() < self._values["v"]:
            self.last_threshold = None
            return (True, RANDOM) if rng.random() <= self.budget else (False, None)
        theta = self._theta
        self.last_threshold = 1.0 - theta
        if self._uncertainty_rule(1.0 - utility, theta):
            return True, UNCERTAINTY
        return False, None


class BalancedQuantileFilter(_Strategy):
    """Balanced incremental quantile filter (Kottke, Krempl, Spiliopoulou, IDA 2015).

    Per frame, with ``H`` the last ``w`` utilities including this one:
    ``θ = quantile_{1-b}(H)`` (linear interpolation),
    ``θ_bal = θ - (max H - min H) · a / w_tol`` where ``a = b·t - q`` is the
    acquisitions left (frames seen ``t``, queried ``q``); query if
    ``u >= θ_bal``. Defaults as scikit-activeml's
    BalancedIncrementalQuantileFilter: ``w=100``, ``w_tol=50``. One change:
    ``a`` is kept in ``[-w_tol, w_tol]`` (beyond that ``θ_bal`` is already past
    the window's extremes), so a stretch blocked by the hourly cap or a budget
    change does not turn into a long unselective burst later.
    """

    name = "quantile"
    SPEC: ClassVar[dict[str, _Param]] = {
        "w": _Param(100.0, 1.0, 1e7, low_open=False, integer=True),
        "w_tol": _Param(50.0, 0.0, float("inf")),
    }

    def __init__(self, budget: float, params: Mapping[str, float] | None = None) -> None:
        self._history: deque[float] = deque()
        self._sorted: list[float] = []
        self._left = 0.0  # a = b·t - q, clipped to ±w_tol
        super().__init__(budget, params)

    def _apply_params(self) -> None:
        self._w = int(self._values["w"])
        self._w_tol = self._values["w_tol"]
        while len(self._history) > self._w:
            self._forget()

    def _forget(self) -> None:
        old = self._history.popleft()
        del self._sorted[bisect.bisect_left(self._sorted, old)]

    def decide(
        self, utility: float, budget_ok: bool, rng: np.random.Generator
    ) -> tuple[bool, str | None]:
        if len(self._history) == self._w:
            self._forget()
        self._history.append(utility)
        ranked = self._sorted
        bisect.insort(ranked, utility)
        position = (len(ranked) - 1) * (1.0 - self.budget)
        low = int(position)
        theta = ranked[low]
        if low + 1 < len(ranked):
            theta += (position - low) * (ranked[low + 1] - theta)
        w_tol = self._w_tol
        left = self._left + self.budget
        balanced = theta - (ranked[-1] - ranked[0]) * left / w_tol
        self.last_threshold = balanced
        selected = budget_ok and utility >= balanced
        if selected:
            left -= 1.0
        self._left = -w_tol if left < -w_tol else (w_tol if left > w_tol else left)
        return (True, UNCERTAINTY) if selected else (False, None)

    @property
    def threshold(self) -> float | None:
        return self.last_threshold


class RandomSampling(_Strategy):
    """Random sampling, the baseline (Žliobaitė et al. 2014, Random): query with probability b.

    As scikit-activeml's RandomBudgetManager: a uniform draw ``<= b`` queries.
    """

    name = "random"

    def decide(
        self, utility: float, budget_ok: bool, rng: np.random.Generator
    ) -> tuple[bool, str | None]:
        if budget_ok and rng.random() <= self.budget:
            return True, RANDOM
        return False, None


THRESHOLD_STRATEGIES: dict[str, type[_Strategy]] = {
    cls.name: cls
    for cls in (
        FixedUncertainty,
        VariableUncertainty,
        RandomizedVariableUncertainty,
        SplitUncertainty,
        BalancedQuantileFilter,
        RandomSampling,
    )
}
"""The threshold strategies by name; ``service.selection.registry.STRATEGIES`` adds the
embedding strategies."""
