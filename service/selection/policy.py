"""The query decision: a strategy under a hard budget, a labels-per-hour cap and backpressure.

The strategies live in ``service.selection.strategies`` (threshold strategies) and
in their own modules (the embedding strategies: ``herding``, ``probcover``,
``typiclust``, ``vessal``; ``service.selection.registry`` names them all). This
engine applies one of them frame by frame (``service.selection.frames``), with the
exact sliding budget and hourly cap of ``service.selection.budget`` and the labeling
queue's backpressure (``service.selection.backpressure``), and lets settings
change live.

Cold start follows AIFT (Zhou et al., CVPR 2017): a model that has learned from no
label is no judge of what is informative, so until it has, its uncertainty is not
used. Its embedding still is: by default the first labels are chosen to cover the
stream (stream MaxHerding, ``cold_start="herding"``), as coverage beats random and
uncertainty at tiny budgets (Hacohen et al., ICML 2022); ``random`` samples at
random, ``none`` runs the configured strategy from the first frame. Once a model
has learned from labels, a coverage cold start keeps leading until the model has
learned from ``cold_start_per_class`` labels per class (5 by default), now weighing
uncertainty against coverage by the model's measured accuracy on the answers to its
requests (``service.selection.competence``), with the stream filters on; then the
configured strategy takes over (by default the balanced quantile filter on the margin
turned into PAL's expected gain by the ``pal`` filter, which counts the frames already
asked for near each frame: on digits, coverage led by 0.88 against 0.75 for random at
50 labels, and after the hand-over the PAL gain kept the default level with
scikit-activeml's StreamProbabilisticAL where the variable threshold on the margin fell
behind it). The embedding strategies, when configured as the strategy, keep that blend
for good.
"""

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import get_args

import numpy as np

from schemas.api import (
    BackpressureState,
    ColdStartName,
    FilterName,
    PolicyName,
    PolicyState,
    PolicyUpdate,
    SelectorName,
    UtilityName,
)
from schemas.scores import DecisionRow
from service.config import PolicySettings
from service.selection.backpressure import Backpressure
from service.selection.base import BaseStrategy, EmbeddingStrategy
from service.selection.budget import HourlyCap, SlidingBudget, selection_limit
from service.selection.competence import Competence
from service.selection.diversity import WindowSelector
from service.selection.filters import DecisionContext, StreamFilters
from service.selection.frames import Gate, decide_frames, decide_window
from service.selection.group_cap import GroupCap
from service.selection.registry import COLD_STARTS, STRATEGIES
from service.selection.strategies import VariableUncertainty

COLD_START = "cold_start"
DRIFT = "drift"


def _variable_family(strategy: BaseStrategy) -> bool:
    return isinstance(strategy, VariableUncertainty)


class QueryPolicy:
    """The query decision the scorer calls once per batch, in stream order.

    A frame is selected only if the strategy, the sliding budget, the hourly cap and
    the backpressure all allow it. Every decision is recorded in the sliding budget;
    every selection in the cap. Live changes (:meth:`update`) keep the budget history.

    Args:
        name: the strategy, one of ``service.selection.registry.STRATEGIES``.
        utility: which score of the mapping given to :meth:`decide` is compared (for the
            embedding strategies: the uncertainty blended with coverage).
        budget: fraction of frames that may be selected over any ``window`` frames.
        window: frames in the sliding budget window.
        labels_per_hour: the cap; None or 0 for none.
        params: strategy knobs (see each strategy's docstring).
        seed: seeds the policy's random generator.
        clock: monotonic seconds for the hourly cap, the boost and the backpressure.
        filters: stream filters applied to the utility (``service.selection.filters``).
        filter_params: their knobs.
        selector: ``coreset`` or ``badge`` to choose which frames of each batch are
            labeled (``service.selection.diversity``); the strategy and budget still say
            how many. Moot with an embedding strategy, which chooses frames itself.
        cold_start: what chooses while the model serving has learned from no label
            (see :meth:`on_model`): a coverage strategy, ``random`` or ``none``.
        cold_start_random: the former switch: True is ``cold_start="random"``, False is
            ``"none"``; None leaves ``cold_start`` as given.
        backpressure: the labeling queue's backpressure; None for none.
        competence: the model's measured accuracy (the blend weight); a default one if None.
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
        cold_start: ColdStartName = "herding",
        cold_start_random: bool | None = None,
        backpressure: Backpressure | None = None,
        competence: Competence | None = None,
        cold_start_per_class: float = 0.0,
    ) -> None:
        self._check_utility(utility)
        if cold_start_random is not None:
            cold_start = "random" if cold_start_random else "none"
        if cold_start not in COLD_STARTS:
            raise ValueError(f"unknown cold start {cold_start!r} (known: {', '.join(COLD_STARTS)})")
        self._filters = StreamFilters(filters, filter_params)
        self._selector = None if selector == "none" else WindowSelector(selector)
        self._params = self._strategy_class(name).check_params(params or {})
        self._budget = SlidingBudget(budget, window)
        self._cap = GroupCap(labels_per_hour, clock)  # shared by the group once assigned
        self._strategy = STRATEGIES[name](budget, self._params)
        self._name: PolicyName = name
        self._utility: UtilityName = utility
        self._rng = np.random.default_rng(seed)
        self._cold_name: ColdStartName = cold_start
        self._cold = self._cold_strategy(budget)
        if cold_start_per_class < 0:
            raise ValueError("cold_start_per_class cannot be negative")
        self._cold_per_class = float(cold_start_per_class)
        self._clock = clock
        self._base_budget = float(budget)
        self._strategy_budget = float(budget)
        self._boost: tuple[float, float] | None = None  # (factor, until) after a drift alarm
        self._pressure = backpressure
        self._competence = competence or Competence()
        self._classes: dict[str, int] = {}
        self._cold_start = False
        self._warming = False  # a model, but too few labels per class: coverage still leads
        self.seen = 0
        self.selected = 0

    @classmethod
    def from_settings(
        cls, settings: PolicySettings, clock: Callable[[], float] = time.monotonic
    ) -> "QueryPolicy":
        """Builds the policy from ``WINNOW_POLICY_*`` settings; ValueError if they cannot work."""
        pressure = Backpressure(
            settings.backpressure_waiting,
            settings.backpressure_wait_s,
            settings.backpressure_window_s,
            clock,
        )
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
            cold_start=settings.cold_start,
            cold_start_random=settings.cold_start_random,
            cold_start_per_class=settings.cold_start_per_class,
            backpressure=pressure if pressure.enabled else None,
            competence=Competence(settings.competence_window, settings.competence_min_answers),
        )

    def _cold_strategy(self, budget: float) -> BaseStrategy | None:
        """The cold-start strategy: the main one if it is the same (it keeps its memory)."""
        if self._cold_name == "none":
            return None
        if self._cold_name == self._name:
            return self._strategy
        return STRATEGIES[self._cold_name](budget, {})

    @property
    def window_limit(self) -> int:
        """Selections allowed per budget window."""
        return self._budget.limit

    @property
    def strategy(self) -> BaseStrategy:
        return self._strategy

    @property
    def utility(self) -> UtilityName:
        """The score this policy compares once the model has learned from labels."""
        return self._utility

    @property
    def cold_start(self) -> bool:
        """True while the model serving has learned from no label: the cold-start strategy
        chooses then (an untrained model's uncertainty is worse than random)."""
        return self._cold_start

    @property
    def warming(self) -> bool:
        """True while a model serves but has learned from fewer than ``cold_start_per_class``
        labels per class: the cold-start strategy still leads, with the filters on."""
        return self._warming

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

    @property
    def backpressure(self) -> Backpressure | None:
        return self._pressure

    @property
    def memory(self) -> int:
        """How many frames asked for the embedding strategies and the ``pal`` filter remember
        (0 for none): the scorer keeps as many inputs to re-embed them when the model changes
        (:meth:`rebase`)."""
        sizes = [s.memory for s in (self._strategy, self._cold) if isinstance(s, EmbeddingStrategy)]
        return max([*sizes, self._filters.memory])

    @property
    def blend(self) -> float:
        """The weight of uncertainty against coverage now (0 during cold start)."""
        return 0.0 if self._cold_start else self._competence.blend

    def on_model(self, labels_trained: int, classes: Sequence[str] | None = None) -> None:
        """Tells the policy which model serves now: cold start while it has learned from
        no label (unless ``cold_start`` is ``none``), the configured strategy after.

        Args:
            labels_trained: labels the model has learned from.
            classes: its class names, to read the labels that come back (:meth:`on_answer`).
        """
        if classes is not None:
            self._classes = {name: index for index, name in enumerate(classes)}
        needed = math.ceil(self._cold_per_class * len(self._classes))
        self._cold_start = self._cold is not None and labels_trained == 0
        self._warming = self._cold is not None and 0 < labels_trained < needed

    def assign_partitions(
        self,
        owned: Sequence[int],
        total: int,
        ages: Mapping[int, Sequence[float]] | None = None,
        unknown: Sequence[int] = (),
    ) -> None:
        """This replica owns ``owned`` of the ``total`` frames partitions: its share of the
        labels-per-hour cap follows (``service.selection.group_cap``). The sliding budget is
        unchanged: a fraction of each replica's frames is that fraction of the group's.

        Args:
            ages: for newly owned partitions, the age in seconds of each request charged to
                them in the last hour.
            unknown: newly owned partitions whose history could not be read (count as full).
        """
        self._cap.assign(owned, total, ages, unknown)

    def revoke_partitions(self) -> None:
        """Joining a consumer group, or partitions are being revoked: the cap allows nothing
        until :meth:`assign_partitions` (the replica's share is not known before)."""
        self._cap.suspend()

    @property
    def capped(self) -> bool:
        """Whether a labels-per-hour cap is set."""
        return self._cap.labels_per_hour is not None

    @property
    def cap_share(self) -> float:
        """This replica's fraction of the frames partitions (1 outside a consumer group)."""
        return self._cap.share

    @property
    def labels_per_hour_share(self) -> int | None:
        """This replica's share of the labels-per-hour cap; None without a cap."""
        return self._cap.limit

    def rebase(self, embeddings: np.ndarray, probabilities: np.ndarray | None = None) -> None:
        """From the next batch on the embeddings come from a new backbone (the scorer calls
        this before deciding the first batch of a full release, not of a head-only one).

        Args:
            embeddings: (K, D) the frames asked for so far (the latest :attr:`memory` of
                them, oldest first) under the new model; (0, D) if none are known.
            probabilities: (K, C) their probabilities under the new model (VeSSAL's
                gradient embeddings need them).
        """
        embeddings = np.asarray(embeddings, dtype=np.float64)
        self._filters.rebase(embeddings)
        done: list[BaseStrategy] = []
        for strategy in (self._strategy, self._cold):
            if isinstance(strategy, EmbeddingStrategy) and strategy not in done:
                strategy.rebase(embeddings, probabilities)
                done.append(strategy)

    def on_answer(self, predicted: str, label: str | None) -> None:
        """An answer to one of this scorer's requests came back.

        Args:
            predicted: the class the model predicted when it asked.
            label: the true class, or None for an ``unlabelable`` answer.
        """
        if self._pressure is not None:
            self._pressure.answered(self._clock())
        if label is not None:
            self._competence.answered(predicted, label)
        self._filters.label(None if label is None else self._classes.get(label))

    def decide(
        self, utilities: Mapping[str, np.ndarray], context: DecisionContext | None = None
    ) -> list[DecisionRow]:
        """Decides every frame of one batch, in stream order.

        Args:
            utilities: score name to an (N,) array, as the scoring engine gives them; it
                must hold every name of :attr:`needs`.
            context: embeddings, probabilities and sources of the frames, for the embedding
                strategies, the stream filters and the windowed selector; without it they
                pass the batch unchanged (embedding strategies then sample at random).

        Returns:
            One ``schemas.Decision`` per frame, as a plain dict (the hot path builds no
            model); ``threshold`` is the one compared at decision time.

        Raises:
            ValueError: a score the policy needs is missing.
        """
        values = self._compared(utilities)
        now = self._clock()  # one clock read per batch: it is decided at once
        if self._boost is not None and now >= self._boost[1]:
            self._boost = None
            self._apply_budget(self._budget.window)
        self._pressure_update(now, len(values))
        gate = Gate(self._budget, self._cap, self._pressure, now)
        tag = DRIFT if self._boost is not None else COLD_START if self._cold_start else None
        # the cold start chooses alone until a model serves, then with the filters and the
        # uncertainty blend until the model has learned enough labels per class
        filters = self._filters if self._filters.active and not self._cold_start else None
        leading = self._cold_start or self._warming
        name: str
        if leading:
            assert self._cold is not None
            strategy, name = self._cold, self._cold_name
        else:
            strategy, name = self._strategy, self._name
        windowed = (
            not leading
            and self._selector is not None
            and context is not None
            and context.embeddings is not None
            and not isinstance(strategy, EmbeddingStrategy)
        )
        if windowed:
            assert self._selector is not None and context is not None
            rows = decide_window(
                values, context, filters, strategy, name, tag, self._selector, gate, self._rng
            )
        else:
            rows = decide_frames(
                values, context, filters, strategy, name, tag, self.blend, gate, self._rng
            )
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
            cap_share=self._cap.share,
            cap_partitions=self._cap.owned,
            labels_per_hour_share=self._cap.limit,
            cap_charged_last_hour=self._cap.charged_last_hour,
            seen=self.seen,
            selected=self.selected,
            params=self._strategy.params(),
            cold_start=self._cold_start,
            cold_start_strategy=self._cold_name,
            blend=self.blend,
            competence=self._competence.value,
            backpressure=self._pressure_state(),
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
            self._strategy.set_params(given)
        self._strategy_budget = -1.0  # set below, on the new strategy too
        self._set_strategy_budget(budget)
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
    def _strategy_class(name: str) -> type[BaseStrategy]:
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
        self._set_strategy_budget(budget)

    # -- the labeling queue's backpressure ---------------------------------------------------

    def _pressure_update(self, now: float, frames: int) -> None:
        """Re-judges the backpressure; the strategies' budget follows its factor, so their
        thresholds rise while the team is behind (the sliding budget itself is unchanged)."""
        if self._pressure is None:
            return
        self._pressure.frames(now, frames)
        factor = self._pressure.update(now, self._budget.budget)
        self._set_strategy_budget(self._budget.budget * factor)

    def _set_strategy_budget(self, budget: float) -> None:
        # a budget below one frame per window would make some strategies never ask at all
        budget = max(budget, 1.0 / self._budget.window)
        if budget != self._strategy_budget:
            self._strategy_budget = budget
            self._strategy.set_budget(budget)
            if self._cold is not None and self._cold is not self._strategy:
                self._cold.set_budget(budget)

    def _pressure_state(self) -> BackpressureState | None:
        pressure = self._pressure
        if pressure is None:
            return None
        now = self._clock()
        requests, answers = pressure.rates(now)
        allowed = pressure.allowed_rate
        return BackpressureState(
            engaged=pressure.engaged,
            throttled=pressure.throttled,
            waiting=pressure.waiting,
            oldest_wait_s=pressure.oldest_wait(now),
            request_rate_per_hour=requests * 3600.0,
            answer_rate_per_hour=answers * 3600.0,
            allowed_rate_per_hour=None if allowed is None else allowed * 3600.0,
            budget_factor=pressure.factor,
            held_back=pressure.held_back,
            max_waiting=pressure.max_waiting,
            max_wait_s=pressure.max_wait_s,
        )
