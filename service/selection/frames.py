"""One batch's decisions, frame by frame in stream order: the strategy under the hard limits.

:class:`~service.selection.policy.QueryPolicy` owns the settings and the state;
these functions run one batch through a strategy, the stream filters and the
:class:`Gate` (sliding budget, hourly cap, backpressure), so that every limit is
checked for every frame exactly as it is decided.
"""

import copy
from dataclasses import dataclass

import numpy as np

from schemas.scores import DecisionRow
from service.selection.backpressure import Backpressure
from service.selection.base import BaseStrategy, EmbeddingStrategy
from service.selection.budget import SlidingBudget
from service.selection.diversity import WindowSelector
from service.selection.filters import AUDIT, DecisionContext, StreamFilters
from service.selection.group_cap import GroupCap


@dataclass
class Gate:
    """The hard limits for one batch, read at one clock time.

    ``allows`` is the budget and the cap (what a strategy may spend); ``admits`` is the
    labeling queue's backpressure (whether a request may go now). A selection the
    backpressure refuses counts as held back, and the strategy sees it as spent: its
    threshold rises as if it had asked, which is what raising the bar means.
    """

    budget: SlidingBudget
    cap: GroupCap
    pressure: Backpressure | None
    now: float

    def __post_init__(self) -> None:
        self._capped = self.cap.labels_per_hour is not None

    def allows(self) -> bool:
        return self.budget.allows() and (not self._capped or self.cap.allows(self.now))

    def admits(self) -> bool:
        return self.pressure is None or self.pressure.allows()

    def refuse(self) -> None:
        if self.pressure is not None:
            self.pressure.hold()

    def record(self, selected: bool) -> int | None:
        """Records one decision; for a selection, the partition its cap share was charged to."""
        self.budget.record(selected)
        if not selected:
            return None
        if self.pressure is not None:
            self.pressure.requested(self.now)
        return self.cap.record(self.now)


def _row(
    selected: bool,
    reason: str | None,
    name: str,
    utility: float,
    threshold: float | None,
    charged: int | None,
) -> DecisionRow:
    row: DecisionRow = {
        "selected": selected,
        "reason": reason if selected else None,
        "policy": name,
        "utility": utility,
        "threshold": threshold,
    }
    if charged is not None:
        row["cap_partition"] = charged
    return row


def decide_frames(
    values: np.ndarray,
    context: DecisionContext | None,
    filters: StreamFilters | None,
    strategy: BaseStrategy,
    name: str,
    tag: str | None,
    blend: float,
    gate: Gate,
    rng: np.random.Generator,
) -> list[DecisionRow]:
    """Frame by frame: the strategy's utility (an embedding strategy's own score, given the
    frames before it), the filters, the strategy's rule, then the gate."""
    embedding = strategy if isinstance(strategy, EmbeddingStrategy) else None
    n = len(values)
    weights = None
    if filters is not None:
        # density weighting is batch-wide: for an embedding strategy it weighs its own score
        weights = filters.begin(
            np.ones(n) if embedding else values, context, uncertainty=embedding is None
        )
    if embedding is not None:
        embedding.begin(values, context, blend)
    decide_one = strategy.decide
    rows: list[DecisionRow] = []
    for index in range(n):
        allowed = gate.allows()
        if embedding is not None:
            utility = embedding.score(index)
            if weights is not None:
                utility *= float(weights[index])
        else:
            utility = float(values[index] if weights is None else weights[index])
        if filters is not None:
            utility = filters.adjust(index, utility)
        selected, reason = decide_one(utility, allowed, rng)
        selected = selected and allowed  # belt and braces: no strategy overspends
        if selected and not gate.admits():
            selected, reason = False, None
            gate.refuse()
        if filters is not None:
            if filters.suppressed(index):
                selected, reason = False, None
            elif not selected and allowed and gate.admits():
                if filters.audit(index, float(values[index]), rng):
                    selected, reason = True, AUDIT
            filters.record(index, selected)
        if embedding is not None:
            embedding.record(index, selected)
        charged = gate.record(selected)
        utility = min(1.0, max(0.0, utility))
        rows.append(_row(selected, tag or reason, name, utility, strategy.last_threshold, charged))
    if embedding is not None:
        embedding.end()
    if filters is not None:
        filters.end()
    return rows


def decide_window(
    values: np.ndarray,
    context: DecisionContext,
    filters: StreamFilters | None,
    strategy: BaseStrategy,
    name: str,
    tag: str | None,
    selector: WindowSelector,
    gate: Gate,
    rng: np.random.Generator,
) -> list[DecisionRow]:
    """Windowed mode: the strategy, run against a copy of the budget, says how many frames
    of the batch to label (k); the selector says which; the real gate then checks each
    chosen frame in stream order, so the limits hold exactly as in the frame-by-frame mode."""
    assert context.embeddings is not None
    adjusted = values if filters is None else filters.begin(values, context)
    shadow = copy.deepcopy(gate.budget)
    cap, now = gate.cap, gate.now
    capped = cap.labels_per_hour is not None
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
    chosen = set(selector.pick(k, eligible, context.embeddings, context.probabilities, rng))
    rows: list[DecisionRow] = []
    for index, utility in enumerate(utilities):
        allowed = gate.allows()
        selected = index in chosen and allowed
        if selected and not gate.admits():
            selected = False
            gate.refuse()
        reason: str | None = selector.name
        if not selected and allowed and filters is not None and gate.admits():
            if filters.audit(index, float(values[index]), rng):
                selected, reason = True, AUDIT
        if filters is not None:
            filters.record(index, selected)
        charged = gate.record(selected)
        rows.append(_row(selected, tag or reason, name, utility, thresholds[index], charged))
    if filters is not None:
        filters.end()
    return rows
