"""The query decision: threshold strategies under a hard budget and a labels-per-hour cap.

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
:class:`~service.budget.SlidingBudget` (and :class:`~service.budget.HourlyCap`):
strategies get ``budget_ok`` and never select without it, and, as in the
paper, adapt their threshold only on frames where the budget allowed a query.
"""

import bisect
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
from pydantic import TypeAdapter

from schemas.api import PolicyName, PolicyState, PolicyUpdate, UtilityName
from schemas.scores import Decision
from service.budget import HourlyCap, SlidingBudget, selection_limit
from service.config import PolicySettings

_DECISIONS = TypeAdapter(list[Decision])

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


@dataclass(frozen=True)
class _Param:
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


_THETA = _Param(1.0, 0.0, 1.0)  # scikit-activeml: theta=1.0, on the certainty scale
_STEP = _Param(0.01, 0.0, 1.0)  # scikit-activeml: s=0.01


class _Strategy:
    """Shared parameter handling; subclasses declare ``SPEC`` and the rule."""

    name: ClassVar[str]
    SPEC: ClassVar[dict[str, _Param]] = {}
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


STRATEGIES: dict[str, type[_Strategy]] = {
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
"""Every strategy by its ``PolicyName``."""


def _variable_family(strategy: ThresholdStrategy) -> bool:
    return isinstance(strategy, VariableUncertainty)


class QueryPolicy:
    """The query decision the scorer calls once per batch, in stream order.

    A frame is selected only if the strategy, the sliding budget and the hourly
    cap all allow it. Every decision is recorded in the sliding budget; every
    selection in the cap. Live changes (:meth:`update`) keep the budget history.

    Args:
        name: the strategy, one of ``STRATEGIES``.
        utility: which score of the mapping given to :meth:`decide` is compared.
        budget: fraction of frames that may be selected over any ``window`` frames.
        window: frames in the sliding budget window.
        labels_per_hour: the cap; None or 0 for none.
        params: strategy knobs (see each strategy's docstring).
        seed: seeds the policy's random generator.
        clock: monotonic seconds for the hourly cap.
    """

    def __init__(
        self,
        name: PolicyName = "variable",
        utility: UtilityName = "entropy",
        budget: float = 0.05,
        window: int = 1000,
        labels_per_hour: float | None = None,
        params: Mapping[str, float] | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check_utility(utility)
        self._params = self._strategy_class(name).check_params(params or {})
        self._budget = SlidingBudget(budget, window)
        self._cap = HourlyCap(labels_per_hour, clock)
        self._strategy: ThresholdStrategy = STRATEGIES[name](budget, self._params)
        self._name: PolicyName = name
        self._utility: UtilityName = utility
        self._rng = np.random.default_rng(seed)
        self.seen = 0
        self.selected = 0

    @classmethod
    def from_settings(
        cls, settings: PolicySettings, clock: Callable[[], float] = time.monotonic
    ) -> "QueryPolicy":
        """Builds the policy from ``WINNOW_POLICY_*`` settings; ValueError if they cannot work."""
        return cls(
            name=settings.name,
            utility=settings.utility,
            budget=settings.budget,
            window=settings.window,
            labels_per_hour=settings.labels_per_hour,
            params=settings.params,
            seed=settings.seed,
            clock=clock,
        )

    @property
    def strategy(self) -> ThresholdStrategy:
        return self._strategy

    def decide(self, utilities: Mapping[str, np.ndarray]) -> list[Decision]:
        """Decides every frame of one batch, in stream order.

        Args:
            utilities: score name to an (N,) array, as ``service.utility.score_batch`` gives.

        Returns:
            One Decision per frame; ``threshold`` is the one compared at decision time.
        """
        try:
            scores = utilities[self._utility]
        except KeyError:
            raise ValueError(
                f"utility {self._utility!r} missing from the scores ({sorted(utilities)})"
            ) from None
        # NaN would never compare as uncertain and would break the quantile window
        values = np.clip(np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0), 0.0, 1.0)
        strategy, rng, name = self._strategy, self._rng, self._name
        budget_allows, record = self._budget.allows, self._budget.record
        cap = self._cap
        capped = cap.labels_per_hour is not None
        now = cap.now() if capped else 0.0  # one clock read per batch: it is decided at once
        decide_one = strategy.decide
        rows = []
        selected_here = 0
        for utility in values.tolist():
            allowed = budget_allows() and (not capped or cap.allows(now))
            selected, reason = decide_one(utility, allowed, rng)
            selected = selected and allowed  # belt and braces: no strategy overspends
            record(selected)
            if selected:
                selected_here += 1
                cap.record(now)
            rows.append(
                {
                    "selected": selected,
                    "reason": reason if selected else None,
                    "policy": name,
                    "utility": utility,
                    "threshold": strategy.last_threshold,
                }
            )
        self.seen += len(rows)
        self.selected += selected_here
        # one validation call for the whole batch is cheaper than 64 constructors
        return _DECISIONS.validate_python(rows)

    def state(self) -> PolicyState:
        """The policy as it stands: settings, live threshold and budget use."""
        return PolicyState(
            name=self._name,
            utility=self._utility,
            budget=self._budget.budget,
            window=self._budget.window,
            labels_per_hour=self._cap.labels_per_hour,
            threshold=self._strategy.threshold,
            budget_used=self._budget.used_ratio,
            labels_last_hour=self._cap.count_last_hour,
            seen=self.seen,
            selected=self.selected,
            params=self._strategy.params(),
        )

    def update(self, change: PolicyUpdate) -> PolicyState:
        """Applies a live change; fields left out keep their values.

        Everything is checked before anything changes, so a refused change
        leaves the policy as it was. Switching strategy keeps the budget and cap
        history (and θ between the variable strategies); ``labels_per_hour=0``
        removes the cap; ``threshold`` sets the live threshold (utility scale)
        of the strategies that have a settable one.

        Raises:
            ValueError: for unknown or out-of-range params, a threshold the
                strategy cannot take, or a budget that allows no selection.
        """
        name = change.name or self._name
        utility = change.utility or self._utility
        budget = self._budget.budget if change.budget is None else change.budget
        window = self._budget.window if change.window is None else change.window
        self._check_utility(utility)
        selection_limit(budget, window)
        if change.labels_per_hour is not None:
            HourlyCap.validate(change.labels_per_hour)
        target = self._strategy_class(name)
        given = target.check_params(change.params or {})
        if change.threshold is not None and not target.threshold_settable:
            raise ValueError(f"policy {name!r} has no threshold that can be set")
        params = {**self._params, **given}

        if (budget, window) != (self._budget.budget, self._budget.window):
            self._budget.resize(budget, window)
        if change.labels_per_hour is not None:
            self._cap.set_rate(change.labels_per_hour)
        if name != self._name:
            old = self._strategy
            self._strategy = target(budget, {k: v for k, v in params.items() if k in target.SPEC})
            if _variable_family(old) and _variable_family(self._strategy) and "theta" not in given:
                self._strategy.set_threshold(old.threshold or 0.0)
            self._name = name
        else:
            self._strategy.set_budget(budget)
            self._strategy.set_params(given)
        self._params = params
        self._utility = utility
        if change.threshold is not None:
            self._strategy.set_threshold(change.threshold)
        return self.state()

    @staticmethod
    def _strategy_class(name: str) -> type[_Strategy]:
        try:
            return STRATEGIES[name]
        except KeyError:
            raise ValueError(f"unknown policy {name!r} (known: {', '.join(STRATEGIES)})") from None

    @staticmethod
    def _check_utility(utility: str) -> None:
        if utility not in ("least_confidence", "margin", "entropy"):
            raise ValueError(f"unknown utility {utility!r}")
