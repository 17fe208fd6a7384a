"""The query decision: a threshold strategy under a hard budget and a labels-per-hour cap.

The strategies live in ``service.selection.strategies``; this engine applies one of them
frame by frame, with the exact sliding budget and the hourly cap of
``service.selection.budget``, and lets settings change live.

Cold start follows AIFT (Zhou et al., CVPR 2017): a model that has learned from no
label is no judge of what is informative, so until it has, frames are sampled at
random within the budget, and the policy asks the scoring engine for no utility.
"""

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from typing import get_args

import numpy as np

from schemas.api import FilterName, PolicyName, PolicyState, PolicyUpdate, SelectorName, UtilityName
from schemas.scores import DecisionRow
from service.config import PolicySettings
from service.selection.budget import HourlyCap, SlidingBudget, selection_limit
from service.selection.diversity import WindowSelector
from service.selection.filters import AUDIT, DecisionContext, StreamFilters
from service.selection.strategies import (
    STRATEGIES,
    RandomSampling,
    ThresholdStrategy,
    VariableUncertainty,
    _Strategy,
)

COLD_START = "cold_start"
DRIFT = "drift"


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
        filters: stream filters applied to the utility (``service.selection.filters``).
        filter_params: their knobs.
        selector: ``coreset`` or ``badge`` to choose which frames of each batch are
            labeled (``service.selection.diversity``); the strategy and budget still say how many.
        cold_start_random: sample at random while the model serving has learned from no
            label (see :meth:`on_model`).
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
        filters: Sequence[FilterName] = (),
        filter_params: Mapping[str, float] | None = None,
        selector: SelectorName = "none",
        cold_start_random: bool = True,
    ) -> None:
        self._check_utility(utility)
        self._filters = StreamFilters(filters, filter_params)
        self._selector = None if selector == "none" else WindowSelector(selector)
        self._params = self._strategy_class(name).check_params(params or {})
        self._budget = SlidingBudget(budget, window)
        self._cap = HourlyCap(labels_per_hour, clock)
        self._strategy: ThresholdStrategy = STRATEGIES[name](budget, self._params)
        self._name: PolicyName = name
        self._utility: UtilityName = utility
        self._rng = np.random.default_rng(seed)
        self._cold = RandomSampling(budget)
        self._clock = clock
        self._base_budget = float(budget)
        self._boost: tuple[float, float] | None = None  # (factor, until) after a drift alarm
        self._cold_start_random = cold_start_random
        self._cold_start = False
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
            filters=settings.filters,
            filter_params=settings.filter_params,
            selector=settings.selector,
            cold_start_random=settings.cold_start_random,
        )

    @property
    def window_limit(self) -> int:
        """Selections allowed per budget window."""
        return self._budget.limit

    @property
    def strategy(self) -> ThresholdStrategy:
        return self._strategy

    @property
    def utility(self) -> UtilityName:
        """The score this policy compares once the model has learned from labels."""
        return self._utility

    @property
    def cold_start(self) -> bool:
        """True while the model serving has learned from no label: frames are then sampled
        at random within the budget (an untrained model's uncertainty is worse than random)."""
        return self._cold_start

    @property
    def needs(self) -> frozenset[UtilityName]:
        """The scores :meth:`decide` compares now: none during cold start, else the utility.

        The scoring engine computes these (and the probability utilities, always).
        """
        return frozenset() if self._cold_start else frozenset((self._utility,))

    @property
    def budget_used(self) -> float:
        """Selected fraction over the current budget window."""
        return self._budget.used_ratio

    def on_model(self, labels_trained: int) -> None:
        """Tells the policy which model serves now: cold start while it has learned from
        no label (and ``cold_start_random`` is on), the configured strategy after."""
        self._cold_start = self._cold_start_random and labels_trained == 0

    def decide(
        self, utilities: Mapping[str, np.ndarray], context: DecisionContext | None = None
    ) -> list[DecisionRow]:
        """Decides every frame of one batch, in stream order.

        Args:
            utilities: score name to an (N,) array, as the scoring engine gives them; it
                must hold every name of :attr:`needs`.
            context: embeddings, probabilities and sources of the frames, for the stream
                filters and the windowed selector; without it they pass the batch unchanged.

        Returns:
            One ``schemas.Decision`` per frame, as a plain dict (the hot path builds no
            model); ``threshold`` is the one compared at decision time.

        Raises:
            ValueError: a score the policy needs is missing.
        """
        values = self._compared(utilities)
        if self._boost is not None and self._clock() >= self._boost[1]:
            self._boost = None
            self._apply_budget(self._budget.window)
        tag = DRIFT if self._boost is not None else COLD_START if self._cold_start else None
        if self._cold_start:
            rows = self._decide_frames(values, values, None, self._cold, "random", tag)
        else:
            filters = self._filters if self._filters.active else None
            adjusted = values if filters is None else filters.begin(values, context)
            if (
                self._selector is not None
                and context is not None
                and context.embeddings is not None
            ):
                rows = self._decide_window(values, adjusted, context, tag)
            else:
                strategy, name = self._strategy, self._name
                rows = self._decide_frames(values, adjusted, filters, strategy, name, tag)
            if filters is not None:
                filters.end()
        self.seen += len(rows)
        self.selected += sum(row["selected"] for row in rows)
        return rows

    def _compared(self, utilities: Mapping[str, np.ndarray]) -> np.ndarray:
        """The utility compared, clipped to [0, 1]. During cold start nothing is compared:
        the decisions record the utility where it was scored anyway, else 0."""
        scores = utilities.get(self._utility)
        if scores is None:
            if not self._cold_start:
                raise ValueError(
                    f"utility {self._utility!r} missing from the scores ({sorted(utilities)})"
                )
            scores = np.zeros(len(next(iter(utilities.values()), ())))
        # NaN would never compare as uncertain and would break the quantile window
        return np.clip(np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0), 0.0, 1.0)

    def _decide_frames(
        self,
        values: np.ndarray,
        adjusted: np.ndarray,
        filters: StreamFilters | None,
        strategy: ThresholdStrategy,
        name: str,
        tag: str | None,
    ) -> list[DecisionRow]:
        """Frame by frame: the strategy under the budget and the cap, then the filters."""
        budget_allows, record = self._budget.allows, self._budget.record
        cap, rng = self._cap, self._rng
        capped = cap.labels_per_hour is not None
        now = cap.now() if capped else 0.0  # one clock read per batch: it is decided at once
        decide_one = strategy.decide
        rows: list[DecisionRow] = []
        for index, utility in enumerate(values.tolist()):
            allowed = budget_allows() and (not capped or cap.allows(now))
            raw = utility
            if filters is not None:
                utility = filters.adjust(index, float(adjusted[index]))
            selected, reason = decide_one(utility, allowed, rng)
            selected = selected and allowed  # belt and braces: no strategy overspends
            if filters is not None:
                if filters.suppressed(index):
                    selected, reason = False, None
                elif not selected and allowed and filters.audit(index, raw, rng):
                    selected, reason = True, AUDIT
                filters.record(index, selected)
            record(selected)
            if selected:
                cap.record(now)
            rows.append(
                {
                    "selected": selected,
                    "reason": (tag or reason) if selected else None,
                    "policy": name,
                    "utility": utility,
                    "threshold": strategy.last_threshold,
                }
            )
        return rows

    def _decide_window(
        self,
        values: np.ndarray,
        adjusted: np.ndarray,
        context: DecisionContext,
        tag: str | None,
    ) -> list[DecisionRow]:
        """Windowed mode: the strategy, run against a copy of the budget, says how many frames
        of the batch to label (k); the selector says which; the real budget and cap then check
        each chosen frame in stream order, so they hold exactly as in the frame-by-frame mode."""
        assert self._selector is not None and context.embeddings is not None
        filters = self._filters if self._filters.active else None
        strategy, name = self._strategy, self._name
        shadow = copy.deepcopy(self._budget)
        cap, rng = self._cap, self._rng
        capped = cap.labels_per_hour is not None
        now = cap.now() if capped else 0.0
        utilities, thresholds, k = [], [], 0
        for index, utility in enumerate(adjusted.tolist()):
            if filters is not None:
                utility = filters.adjust(index, utility)
            allowed = shadow.allows() and (not capped or cap.allows(now))
            selected, _ = strategy.decide(utility, allowed, rng)
            selected = selected and allowed and not (filters and filters.suppressed(index))
            shadow.record(selected)
            k += selected
            utilities.append(utility)
            thresholds.append(strategy.last_threshold)
        eligible = [i for i in range(len(values)) if not (filters and filters.suppressed(i))]
        chosen = set(
            self._selector.pick(k, eligible, context.embeddings, context.probabilities, rng)
        )
        rows: list[DecisionRow] = []
        for index, utility in enumerate(utilities):
            allowed = self._budget.allows() and (not capped or cap.allows(now))
            selected = index in chosen and allowed
            reason: str | None = self._selector.name
            if not selected and allowed and filters is not None:
                if filters.audit(index, float(values[index]), rng):
                    selected, reason = True, AUDIT
            self._budget.record(selected)
            if filters is not None:
                filters.record(index, selected)
            if selected:
                cap.record(now)
            rows.append(
                {
                    "selected": selected,
                    "reason": (tag or reason) if selected else None,
                    "policy": name,
                    "utility": utility,
                    "threshold": thresholds[index],
                }
            )
        return rows

    def state(self) -> PolicyState:
        """The policy as it stands: settings, live threshold and budget use."""
        return PolicyState(
            name=self._name,
            utility=self._utility,
            budget=self._base_budget,
            effective_budget=self._budget.budget,
            boost_seconds_left=max(0.0, self._boost[1] - self._clock()) if self._boost else 0.0,
            window=self._budget.window,
            labels_per_hour=self._cap.labels_per_hour,
            threshold=self._strategy.threshold,
            budget_used=self._budget.used_ratio,
            labels_last_hour=self._cap.count_last_hour,
            seen=self.seen,
            selected=self.selected,
            params=self._strategy.params(),
            cold_start=self._cold_start,
            filters=list(self._filters.names),  # type: ignore[arg-type]
            filter_params=dict(self._filters.params),
            selector=self._selector.name if self._selector is not None else "none",
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
        budget = self._base_budget if change.budget is None else change.budget
        window = self._budget.window if change.window is None else change.window
        self._check_utility(utility)
        selection_limit(budget, window)
        if change.labels_per_hour is not None:
            HourlyCap.validate(change.labels_per_hour)
        target = self._strategy_class(name)
        given = target.check_params(change.params or {})
        if change.threshold is not None and not target.threshold_settable:
            raise ValueError(f"policy {name!r} has no threshold that can be set")
        StreamFilters.check(
            self._filters.names if change.filters is None else change.filters,
            change.filter_params or {},
        )
        params = {**self._params, **given}

        self._base_budget = budget
        budget = self._effective_budget()
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
        self._cold.set_budget(budget)
        self._params = params
        self._utility = utility
        if change.threshold is not None:
            self._strategy.set_threshold(change.threshold)
        if change.filters is not None or change.filter_params:
            names = self._filters.names if change.filters is None else change.filters
            self._filters.configure(names, change.filter_params or {})
        if change.selector is not None:
            current = self._selector.name if self._selector is not None else "none"
            if change.selector != current:
                self._selector = (
                    None if change.selector == "none" else WindowSelector(change.selector)
                )
        return self.state()

    @staticmethod
    def _strategy_class(name: str) -> type[_Strategy]:
        try:
            return STRATEGIES[name]
        except KeyError:
            raise ValueError(f"unknown policy {name!r} (known: {', '.join(STRATEGIES)})") from None

    @staticmethod
    def _check_utility(utility: str) -> None:
        if utility not in get_args(UtilityName):
            raise ValueError(f"unknown utility {utility!r}")

    # -- the drift response ------------------------------------------------------------------

    def boost(self, factor: float, seconds: float) -> None:
        """Multiplies the budget by ``factor`` for ``seconds`` (capped at 1); selections made
        meanwhile carry the reason ``drift``. The labels-per-hour cap still holds.

        Raises:
            ValueError: a factor below 1 or a non-positive duration.
        """
        if factor < 1 or seconds <= 0:
            raise ValueError("a budget boost needs factor >= 1 and seconds > 0")
        self._boost = (float(factor), self._clock() + seconds)
        self._apply_budget(self._budget.window)

    @property
    def boosted(self) -> bool:
        return self._boost is not None

    def _effective_budget(self) -> float:
        factor = self._boost[0] if self._boost is not None else 1.0
        return min(1.0, self._base_budget * factor)

    def _apply_budget(self, window: int) -> None:
        budget = self._effective_budget()
        if budget != self._budget.budget:
            self._budget.resize(budget, window)
            self._strategy.set_budget(budget)
            self._cold.set_budget(budget)
