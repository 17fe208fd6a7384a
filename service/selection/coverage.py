"""The embedding space coverage strategies share: the stream's reservoir, the frames asked for.

Coverage strategies (herding, ProbCover, TypiClust) judge a frame by how much of
the stream it would cover that the frames already asked for do not. A stream
has no pool, so the stream is represented by a reservoir sample of the frames
seen since the model last changed, and "already asked for" by a bounded memory
of the selected frames' embeddings:

- embeddings are compared as unit vectors (``e / ||e||``, as uncertainty herding
  does), so ``||a - b||² = 2 - 2 a·b`` and one matrix product gives every distance;
- the reservoir is Vitter's algorithm R with the count of frames capped at a
  ``horizon``: a frame replaces a random row with probability ``m / min(t, horizon)``,
  so the sample stays uniform over the last ``horizon`` frames or so and follows a
  stream that changes;
- for every reservoir row the space keeps ``d²(x, S) = min_{s∈S} ||x - s||²``, the
  squared distance to the nearest frame asked for. The kernel coverage of herding
  (``max_s k(x, s) = exp(-d²(x, S)/h)``), ProbCover's δ-ball coverage
  (``d²(x, S) <= δ²``) and TypiClust's covered clusters all follow from it, so no
  kernel is recomputed when the bandwidth changes. A frame forgotten by the bounded
  memory keeps covering the rows it covered until they leave the reservoir;
- the scale ``h``, the median squared distance between reservoir rows, is refreshed
  whenever the reservoir has doubled since, and every ``m`` insertions after.

Per batch of B frames: O(B·(m + M)·D) for the distances to the reservoir (m rows)
and the memory (M rows), D the embedding size; O(m + B) per selection.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from service.selection.base import EmbeddingStrategy, Param
from service.selection.memory import RowRing
from service.selection.strategies import RANDOM, BalancedQuantileFilter

if TYPE_CHECKING:
    from service.selection.filters import DecisionContext

_MIN_ROWS = 8  # below this many reservoir rows the batch itself sets the scale
_SCALE_SAMPLE = 256  # rows whose pairwise distances estimate the scale
_SAME_SPACE = 1e-3  # unit embeddings this close are one space (float16 inputs re-embedded)


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Each row divided by its norm (zero rows stay zero), as float64."""
    rows = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``||a_i - b_j||²`` for unit rows: ``2 - 2 a_i·b_j``, clipped at 0 against rounding."""
    return np.maximum(2.0 - 2.0 * (a @ b.T), 0.0)


@dataclass
class Targets:
    """One batch against the space: the points to cover are the reservoir rows, then the batch.

    Attributes:
        d2: (B, n) squared distances from each batch frame to each target.
        dmin: (n,) squared distance of each target to the nearest frame asked for
            (``inf`` while nothing was asked for); updated as the batch's frames are selected.
        utility: (n,) the uncertainty utility of each target when it was scored.
        offset: where the batch's own rows start among the targets (the reservoir size).
        rows: (B, D) the batch's unit embeddings.
    """

    d2: np.ndarray
    dmin: np.ndarray
    utility: np.ndarray
    offset: int
    rows: np.ndarray

    @property
    def n(self) -> int:
        return len(self.dmin)


class EmbeddingSpace:
    """Reservoir of the stream and memory of the frames asked for, in one model's space.

    Args:
        reservoir: rows of the reservoir (m).
        memory: frames asked for that are remembered (M); the oldest is forgotten first.
        horizon: frames over which the reservoir stays roughly uniform (default 10·m).
        seed: seeds the reservoir's replacement draws.
    """

    def __init__(
        self, reservoir: int = 512, memory: int = 256, horizon: int | None = None, seed: int = 0
    ) -> None:
        if reservoir < 1 or memory < 1:
            raise ValueError("the reservoir and the memory need at least one row")
        self.capacity = int(reservoir)
        self.memory_capacity = int(memory)
        self.horizon = int(horizon or 10 * reservoir)
        self._rng = np.random.default_rng(seed)
        self.clear()

    def clear(self) -> None:
        """Forgets the reservoir and the memory (a new embedding space)."""
        self._rows: np.ndarray | None = None
        self._dmin = np.empty(0)
        self._utility = np.empty(0)
        self.size = 0
        self.seen = 0
        self._asked = RowRing(self.memory_capacity)
        self.scale: float | None = None
        self._scale_size = 0
        self._inserted = 0
        self.version = 0  # bumped whenever the reservoir's rows are re-estimated (scale)

    # -- the memory of frames asked for -------------------------------------------------------

    @property
    def memory(self) -> np.ndarray:
        """The remembered unit embeddings (order not kept once the memory wrapped)."""
        return self._asked.rows

    @property
    def remembered(self) -> int:
        """Frames asked for that are remembered."""
        return self._asked.size

    def remember(self, row: np.ndarray) -> None:
        """Adds one frame asked for; the oldest is overwritten once the memory is full."""
        self._asked.add(row)

    def rebase(self, embeddings: np.ndarray) -> None:
        """A new embedding space: the reservoir starts over, the memory holds ``embeddings``
        (the latest frames asked for, oldest first). Embeddings equal to the memory's (a new
        head on the same backbone) keep the space as it is."""
        rows = unit_rows(embeddings)[-self.memory_capacity :] if len(embeddings) else None
        if rows is not None and self._same_space(rows):
            return
        self.clear()
        if rows is not None:
            self._asked.replace(rows)

    def _same_space(self, rows: np.ndarray) -> bool:
        if not self.remembered or len(rows) != self.remembered or rows.shape[1] != self.dim:
            return False
        return bool(np.abs(self._asked.ordered() - rows).max() <= _SAME_SPACE)

    @property
    def dim(self) -> int:
        return self._asked.dim

    def nearest_asked(self, rows: np.ndarray) -> np.ndarray:
        """``d²(x, S)`` for each of ``rows``; ``inf`` while nothing was asked for."""
        if self.remembered == 0:
            return np.full(len(rows), np.inf)
        return squared_distances(rows, self.memory).min(axis=1)

    # -- one batch ----------------------------------------------------------------------------

    def targets(self, rows: np.ndarray, utility: np.ndarray) -> Targets:
        """The batch (unit ``rows``, their ``utility``) against the reservoir and the memory."""
        size = self.size
        reservoir = self._rows[:size] if self._rows is not None else np.empty((0, rows.shape[1]))
        points = np.vstack([reservoir, rows]) if size else rows
        return Targets(
            d2=squared_distances(rows, points),
            dmin=np.concatenate([self._dmin[:size], self.nearest_asked(rows)]),
            utility=np.concatenate([self._utility[:size], utility]),
            offset=size,
            rows=rows,
        )

    def select(self, targets: Targets, index: int) -> None:
        """Frame ``index`` of the batch was asked for: it covers the targets near it."""
        np.minimum(targets.dmin, targets.d2[index], out=targets.dmin)
        self.remember(targets.rows[index])

    def commit(self, targets: Targets) -> None:
        """Keeps the targets' coverage and lets the batch's frames into the reservoir."""
        size = targets.offset
        self._dmin[:size] = targets.dmin[:size]
        rows, dmin, utility = targets.rows, targets.dmin[size:], targets.utility[size:]
        if self._rows is None:
            self._rows = np.zeros((self.capacity, rows.shape[1]))
            self._dmin = np.full(self.capacity, np.inf)
            self._utility = np.zeros(self.capacity)
        for i in range(len(rows)):
            self.seen += 1
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
            else:
                draw = int(self._rng.integers(min(self.seen, self.horizon)))
                if draw >= self.capacity:
                    continue
                slot = draw
            self._rows[slot], self._dmin[slot], self._utility[slot] = rows[i], dmin[i], utility[i]
            self._inserted += 1
        if self.size >= max(_MIN_ROWS, 2 * self._scale_size) or self._inserted >= self.capacity:
            self._refresh()

    def batch_scale(self, targets: Targets) -> float:
        """The scale ``h``: the reservoir's, or the batch's own while the reservoir is small."""
        if self.scale is not None:
            return self.scale
        positive = targets.d2[targets.d2 > 0]
        return float(np.median(positive)) if positive.size else 1.0

    @property
    def reservoir(self) -> np.ndarray:
        """The reservoir's unit rows."""
        return self._rows[: self.size] if self._rows is not None else np.empty((0, 0))

    def reservoir_distances(self) -> np.ndarray:
        """(m, m) squared distances between reservoir rows (for refresh-time statistics)."""
        return squared_distances(self.reservoir, self.reservoir)

    def _refresh(self) -> None:
        rows = self._rows[: self.size] if self._rows is not None else None
        if rows is None or self.size < 2:
            return
        sample = rows
        if self.size > _SCALE_SAMPLE:
            sample = rows[self._rng.choice(self.size, _SCALE_SAMPLE, replace=False)]
        d2 = squared_distances(sample, sample)
        upper = d2[np.triu_indices(len(sample), k=1)]
        positive = upper[upper > 0]
        self.scale = float(np.median(positive)) if positive.size else 1.0
        self._scale_size = self.size
        self._inserted = 0
        self.version += 1


class CoverageStrategy(EmbeddingStrategy):
    """A coverage score per frame, thresholded under the budget by the balanced quantile filter.

    Subclasses say how a frame scores against the :class:`Targets` (:meth:`_score`);
    this class keeps the space, blends in the uncertainty utility and decides. The
    decision is the balanced incremental quantile filter of Kottke, Krempl and
    Spiliopoulou (IDA 2015) on the score (knobs ``w``, ``w_tol``), the same rule as the
    ``quantile`` policy, so each keeps its budget whatever the scale of its scores.
    Without embeddings (no context) a frame is asked for with probability ``b``.

    The blend weight λ (``blend``) multiplies the score by ``(1 - λ) + λ·u`` where ``u``
    is the frame's uncertainty utility (herding weighs the covered frames instead).
    """

    SPEC: ClassVar[dict[str, Param]] = {
        "w": Param(100.0, 1.0, 1e7, low_open=False, integer=True),
        "w_tol": Param(50.0, 0.0, float("inf")),
        "reservoir": Param(512.0, 1.0, 65536.0, low_open=False, integer=True),
        "memory": Param(256.0, 1.0, 65536.0, low_open=False, integer=True),
    }
    reason: ClassVar[str] = "coverage"

    def __init__(self, budget: float, params: Mapping[str, float] | None = None) -> None:
        self._filter: BalancedQuantileFilter | None = None
        self.space: EmbeddingSpace | None = None
        super().__init__(budget, params)
        self._targets: Targets | None = None
        self._blend = 0.0
        self._fallback = False

    def _apply_params(self) -> None:
        window = {"w": self._values["w"], "w_tol": self._values["w_tol"]}
        if self._filter is None:
            self._filter = BalancedQuantileFilter(self.budget, window)
        else:
            self._filter.set_params(window)
        reservoir, memory = int(self._values["reservoir"]), int(self._values["memory"])
        self.memory = memory
        space = self.space
        if space is None or (space.capacity, space.memory_capacity) != (reservoir, memory):
            self.space = EmbeddingSpace(reservoir, memory)

    def set_budget(self, budget: float) -> None:
        super().set_budget(budget)
        assert self._filter is not None
        self._filter.set_budget(budget)

    @property
    def threshold(self) -> float | None:
        return self.last_threshold

    def begin(self, utilities: np.ndarray, context: "DecisionContext | None", blend: float) -> None:
        self._blend = float(min(max(blend, 0.0), 1.0))
        self._fallback = context is None or context.embeddings is None
        if self._fallback:
            self._targets = None
            return
        assert context is not None and context.embeddings is not None and self.space is not None
        rows = unit_rows(context.embeddings)
        self._targets = self.space.targets(rows, np.asarray(utilities, dtype=np.float64))
        self._prepare(self._targets, context)

    def _prepare(self, targets: Targets, context: "DecisionContext") -> None:
        """Hook: per-batch vectorised work of the subclass."""

    def _score(self, targets: Targets, index: int) -> float:
        raise NotImplementedError

    def score(self, index: int) -> float:
        if self._targets is None:
            return 0.0
        score = self._score(self._targets, index)
        if self._blend > 0.0:
            own = self._targets.utility[self._targets.offset + index]
            score *= (1.0 - self._blend) + self._blend * own
        return float(min(max(score, 0.0), 1.0))

    def decide(
        self, utility: float, budget_ok: bool, rng: np.random.Generator
    ) -> tuple[bool, str | None]:
        if self._fallback:
            self.last_threshold = None
            if budget_ok and rng.random() <= self.budget:
                return True, RANDOM
            return False, None
        assert self._filter is not None
        selected, _ = self._filter.decide(utility, budget_ok, rng)
        self.last_threshold = self._filter.last_threshold
        return (True, self.reason) if selected else (False, None)

    def record(self, index: int, selected: bool) -> None:
        if selected and self._targets is not None and self.space is not None:
            self.space.select(self._targets, index)

    def end(self) -> None:
        if self._targets is not None and self.space is not None:
            self.space.commit(self._targets)
        self._targets = None

    def rebase(self, embeddings: np.ndarray, probabilities: np.ndarray | None) -> None:
        assert self.space is not None
        self.space.rebase(embeddings)
