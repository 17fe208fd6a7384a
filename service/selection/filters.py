"""Stream filters: diversity and balance between the utility and the query decision.

A threshold strategy looks at one frame at a time; at video rates it would
send five near-identical frames of one scene, all from the busiest class.
These filters reshape the utility ``u`` of each frame before the strategy
compares it, using the frame's embedding, predicted class and source:

- ``dedup`` — near-duplicate suppression per source: ``u = 0`` when the
  cosine similarity of the embedding to one of the frames selected from the
  same source within the last ``dedup_window`` frames of that source is at
  least ``dedup_similarity``.
- ``density`` — density weighting (Settles and Craven 2008, information
  density): ``u · min(1, d / d̄)^β`` with ``d = mean_r exp(-||e - r||² / h)``
  over a reservoir of recent embeddings (``h`` the median squared distance)
  and ``d̄`` its batch mean, so informative frames in dense regions win over
  outliers.
- ``balance`` — class balance: ``u · min(1, (1/C) / s_c)^γ`` where ``s_c`` is
  the share of the predicted class among the last ``balance_window``
  selections.
- ``audit`` — a fraction ``audit_fraction`` of the confident frames
  (``u <= audit_utility``) the strategy passed over is selected anyway, with
  the reason ``audit``, to measure the errors the model is sure about.
- ``rare`` — class-aware selection for imbalanced streams, after DIRECT
  (Nuggehalli et al., "DIRECT: deep active learning under imbalance and label
  noise", 2023: label where the minority class meets the decision boundary and
  balance the labels across classes): ``u · (Σ_k p_k ω_k / max_k ω_k)^γ`` with
  ``ω_k = 1 / (n_k + 1)``, ``n_k`` the labels of class ``k`` received so far plus the
  requests still unanswered that were predicted ``k``, and ``γ = rare_power``. The
  factor is the expected rarity of the frame's true class under the model: a frame
  that may well belong to a class few labels have is kept, and among uncertain
  frames (near a boundary) those near a rare class's boundary win. O(C) per frame.
- ``pal`` — probabilistic active learning (Kottke et al. 2015; ``service.selection.pal``):
  the utility becomes PAL's expected gain from the model's probabilities ``p`` and
  ``n``, the RBF kernel count of the frames asked for near the frame (the latest
  ``pal_memory`` of them, unit embeddings, width by the mean criterion), with
  ``prior = pal_prior`` and up to ``pal_labels`` hypothetical labels: an uncertain
  frame where few frames were asked for wins over one where many were. Frames asked
  for earlier in the batch count at once. O((M + B)·D + L·C) per frame (M remembered,
  B the batch, L the labellings). Its memory lives in the model's embedding space: a
  new backbone re-embeds it (``rebase``). It replaces only an uncertainty: while an
  embedding strategy decides (a coverage cold start, say), its score stands and
  ``pal`` only remembers the frames asked for.

Duplicate similarities are computed on embeddings centred by the reservoir mean once it
holds 32 frames (raw post-ReLU embeddings are all alike). Every filter is optional and needs only
the context it names; a batch without context passes unchanged.
"""

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, get_args

import numpy as np

from schemas.api import FilterName
from service.selection.memory import RowRing
from service.selection.pal import expected_gain, mean_gamma

FILTERS: tuple[FilterName, ...] = get_args(FilterName)
AUDIT = "audit"
_MIN_RESERVOIR = 32
_PENDING = 4096  # unanswered requests whose predicted class is kept
_RECENT_MAX = 256  # selected frames a source's dedup memory keeps at most, whatever the window
_SOURCES_MAX = 4096
"""Sources whose dedup memory (frame count and selected rows) is kept: the most recently seen.
A source seen again after it fell out starts afresh, as after a restart, so a stream whose
source ids keep changing (a key per session or per device boot) cannot grow the filter."""


@dataclass(frozen=True)
class DecisionContext:
    """What the scorer knows of each frame beside its utility; every field is optional.

    Attributes:
        embeddings: (N, D) model embeddings.
        probabilities: (N, C) class probabilities (predicted class and C).
        sources: N source ids (the Kafka key), None for unknown.
    """

    embeddings: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    sources: Sequence[str | None] | None = None


class StreamFilters:
    """The configured filters, with the state they keep across batches."""

    DEFAULTS: ClassVar[dict[str, float]] = {
        "dedup_similarity": 0.9,
        "dedup_window": 64.0,
        "density_beta": 1.0,
        "density_reservoir": 256.0,
        "balance_window": 100.0,
        "balance_power": 1.0,
        "audit_fraction": 0.01,
        "audit_utility": 0.1,
        "rare_power": 1.0,
        "pal_prior": 1e-3,
        "pal_labels": 2.0,
        "pal_memory": 256.0,
    }

    def __init__(self, names: Sequence[str] = (), params: Mapping[str, float] | None = None):
        self.names: tuple[str, ...] = ()
        self.params = dict(self.DEFAULTS)
        self.configure(names, params or {})
        self._reservoir: deque[np.ndarray] = deque(maxlen=int(self.params["density_reservoir"]))
        self._recent: dict[str | None, deque[tuple[int, np.ndarray]]] = {}
        self._frames: dict[str | None, int] = {}  # per source, oldest seen first; dedup only
        self._classes: deque[int] = deque(maxlen=int(self.params["balance_window"]))
        self._batch: _BatchView | None = None
        self._labels = np.zeros(0)  # labels received per class
        self._pending: deque[int] = deque(maxlen=_PENDING)  # predicted class of each request
        self._pending_counts = np.zeros(0)
        self._asked = RowRing(self.memory or 1)  # unit rows of the frames asked for; pal only
        self._asked_gamma = (0, 1.0)  # the kernel width, and the memory version it is of

    @property
    def memory(self) -> int:
        """Frames asked for whose embeddings the filters keep (``pal``'s), 0 for none: the
        scorer keeps as many inputs to re-embed them under a new backbone."""
        return int(self.params["pal_memory"]) if "pal" in self.names else 0

    def rebase(self, embeddings: np.ndarray) -> None:
        """A new backbone: ``embeddings`` are the latest frames asked for (oldest first) in
        its space; ``pal``'s memory of them is replaced. The density reservoir (whose mean
        also centres the duplicate similarities) and the frames ``dedup`` remembers per
        source were embedded by the old backbone, whose space the new one does not share:
        they are dropped and refill from the next batch (density weighting and centring
        wait for 32 frames; ``dedup`` compares with the frames selected from then on)."""
        self._reservoir.clear()
        self._recent.clear()  # the frame counts per source (the dedup windows) stay
        rows = np.asarray(embeddings, dtype=np.float64)
        self._asked.clear()
        if rows.ndim == 2 and len(rows) and self.memory:
            self._asked.replace(self._unit(rows))

    @classmethod
    def check(cls, names: Sequence[str], params: Mapping[str, float]) -> None:
        unknown = sorted(set(names) - set(FILTERS))
        if unknown:
            raise ValueError(f"unknown filters {unknown} (known: {', '.join(FILTERS)})")
        bad = sorted(set(params) - set(cls.DEFAULTS))
        if bad:
            raise ValueError(f"unknown filter params {bad} (known: {', '.join(cls.DEFAULTS)})")
        for key, value in params.items():
            if value < 0 or (key == "audit_fraction" and value > 1):
                raise ValueError(f"filter param {key!r} out of range: {value}")
            if key in ("pal_prior", "pal_labels", "pal_memory") and value <= 0:
                raise ValueError(f"filter param {key!r} must be positive: {value}")
            if key == "pal_labels" and value > 4:
                raise ValueError(f"filter param 'pal_labels' above 4 costs too much: {value}")

    def configure(self, names: Sequence[str], params: Mapping[str, float]) -> None:
        self.check(names, params)
        self.names = tuple(dict.fromkeys(names))
        self.params.update({k: float(v) for k, v in params.items()})
        if hasattr(self, "_classes"):
            self._classes = deque(self._classes, maxlen=int(self.params["balance_window"]))
            self._reservoir = deque(self._reservoir, maxlen=int(self.params["density_reservoir"]))
            self._asked = self._asked.resized(self.memory or 1)
            self._asked_gamma = (0, 1.0)

    @property
    def active(self) -> bool:
        return bool(self.names)

    # -- per batch ----------------------------------------------------------------------------

    def begin(
        self, utilities: np.ndarray, context: DecisionContext | None, uncertainty: bool = True
    ) -> np.ndarray:
        """Prepares a batch; returns the utilities after the batch-wide (density) weighting.

        Args:
            uncertainty: whether the utility is an uncertainty (a threshold strategy's), which
                ``pal`` replaces; an embedding strategy's own score is left to it (its coverage
                already counts the frames asked for), and ``pal`` only remembers them.
        """
        context = context or DecisionContext()
        pal = "pal" in self.names
        self._batch = _BatchView(context, self._center(context.embeddings), len(utilities), pal)
        out = utilities.copy()
        if pal and uncertainty and self._batch.unit_raw is not None:
            self._batch.pal_base = self._pal_counts(self._batch.unit_raw)
        if "density" in self.names and self._batch.raw is not None and self._reservoir:
            reservoir = np.stack(self._reservoir)
            raw = self._batch.raw
            squared = (
                (raw**2).sum(1)[:, None] + (reservoir**2).sum(1)[None, :] - 2 * raw @ reservoir.T
            )
            squared = np.maximum(squared, 0.0)
            bandwidth = max(float(np.median(squared)), 1e-12)  # the median heuristic
            density = np.exp(-squared / bandwidth).mean(axis=1)
            reference = density.mean()
            if reference > 0:
                weight = np.minimum(1.0, density / reference) ** self.params["density_beta"]
                out *= weight
                self._batch.weight = weight
        return out

    def adjust(self, index: int, utility: float) -> float:
        """The frame's utility after duplicate suppression and class balance."""
        batch = self._batch
        if batch is None:
            return utility
        if "dedup" in self.names and batch.unit is not None and self._is_duplicate(index):
            batch.suppressed.add(index)
            return 0.0
        if "pal" in self.names and batch.pal_base is not None and batch.probabilities is not None:
            utility = self._pal(index) * float(batch.weight[index])
        if "balance" in self.names and batch.predicted is not None and self._classes:
            share = self._classes.count(int(batch.predicted[index])) / len(self._classes)
            fair = 1.0 / batch.n_classes
            if share > fair:
                utility *= (fair / share) ** self.params["balance_power"]
        if "rare" in self.names and batch.probabilities is not None:
            utility *= self.rarity(batch.probabilities[index]) ** self.params["rare_power"]
        return utility

    def rarity(self, probabilities: np.ndarray) -> float:
        """``Σ_k p_k ω_k / max_k ω_k``: the expected rarity of the frame's true class."""
        counts = self._counts(len(probabilities))
        weights = 1.0 / (counts + 1.0)
        return float(probabilities @ weights / weights.max())

    def label(self, class_index: int | None) -> None:
        """An answer came back: the oldest unanswered request is answered; ``class_index``
        is its true class (None: unlabelable, or a class the model does not have)."""
        if self._pending:
            old = self._pending.popleft()
            self._pending_counts[old] -= 1
        if class_index is not None:
            self._grow(class_index + 1)
            self._labels[class_index] += 1

    def _counts(self, n_classes: int) -> np.ndarray:
        self._grow(n_classes)
        return (self._labels + self._pending_counts)[:n_classes]

    def _grow(self, n_classes: int) -> None:
        if len(self._labels) < n_classes:
            self._labels = np.pad(self._labels, (0, n_classes - len(self._labels)))
            self._pending_counts = np.pad(
                self._pending_counts, (0, n_classes - len(self._pending_counts))
            )

    def audit(self, index: int, raw_utility: float, rng: np.random.Generator) -> bool:
        """Whether to select a frame the strategy passed over, as an audit of a confident one."""
        if "audit" not in self.names or raw_utility > self.params["audit_utility"]:
            return False
        if self._batch is not None and index in self._batch.suppressed:
            return False
        return bool(rng.random() < self.params["audit_fraction"])

    def suppressed(self, index: int) -> bool:
        return self._batch is not None and index in self._batch.suppressed

    def record(self, index: int, selected: bool) -> None:
        """Called for every frame in stream order after its decision."""
        batch = self._batch
        if batch is None:
            return
        if "dedup" in self.names:
            source = batch.source(index)
            frame = self._count(source)
            if selected and batch.raw is not None:
                self._remember(source, frame, batch.raw[index])
        if not selected:
            return
        if "pal" in self.names and batch.unit_raw is not None:
            row = batch.unit_raw[index]
            self._asked.add(row)  # copied in: a view would keep the whole batch alive
            if batch.pal_base is not None:  # the frames after it count it at once
                squared = np.maximum(2.0 - 2.0 * (batch.unit_raw @ row), 0.0)
                batch.pal_base = batch.pal_base + np.exp(-batch.pal_gamma * squared)
                batch.pal_gain = None
        if batch.predicted is not None:
            predicted = int(batch.predicted[index])
            self._classes.append(predicted)
            if len(self._pending) == self._pending.maxlen:  # the oldest falls out uncounted
                self._pending_counts[self._pending[0]] -= 1
            self._pending.append(predicted)
            self._grow(predicted + 1)
            self._pending_counts[predicted] += 1

    def end(self) -> None:
        """Adds the batch's embeddings to the density reservoir."""
        batch, self._batch = self._batch, None
        if batch is not None and batch.raw is not None:
            self._reservoir.extend(batch.raw)

    # -- helpers ------------------------------------------------------------------------------

    def _pal_counts(self, rows: np.ndarray) -> np.ndarray:
        """The kernel count of the remembered frames near each of ``rows`` (unit); sets the
        kernel width for the batch. Zero while nothing was asked for."""
        batch = self._batch
        assert batch is not None
        if not self._asked:
            batch.pal_gamma = 1.0 / max(rows.shape[1], 1)
            return np.zeros(len(rows))
        asked = self._asked.rows
        if self._asked_gamma[0] != self._asked.version:  # once per change of the memory
            self._asked_gamma = (self._asked.version, mean_gamma(asked))
        batch.pal_gamma = self._asked_gamma[1]
        squared = np.maximum(2.0 - 2.0 * (rows @ asked.T), 0.0)
        return np.exp(-batch.pal_gamma * squared).sum(axis=1)

    def _pal(self, index: int) -> float:
        """PAL's gain of frame ``index``: computed for the whole batch at once, and again after
        each frame of the batch asked for (it counts at once)."""
        batch = self._batch
        assert batch is not None and batch.pal_base is not None
        assert batch.probabilities is not None
        if batch.pal_gain is None:
            k = batch.pal_base[:, None] * batch.probabilities
            prior, labels = self.params["pal_prior"], int(self.params["pal_labels"])
            batch.pal_gain = expected_gain(k, prior, labels)
        return float(batch.pal_gain[index])

    def _center(self, embeddings: np.ndarray | None) -> np.ndarray | None:
        if embeddings is None:
            return None
        if len(self._reservoir) < _MIN_RESERVOIR:  # too few frames to know the mean
            return None
        return np.mean(self._reservoir, axis=0)

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        return x / np.where(norm > 0, norm, 1.0)

    def _count(self, source: str | None) -> int:
        """Counts a frame of ``source``; returns its number. Forgets the source seen longest
        ago once more than ``_SOURCES_MAX`` are known."""
        frames = self._frames
        frames[source] = frame = frames.pop(source, 0) + 1  # re-inserted: now the newest
        if len(frames) > _SOURCES_MAX:
            oldest = next(iter(frames))
            del frames[oldest]
            self._recent.pop(oldest, None)
        return frame

    def _remember(self, source: str | None, frame: int, embedding: np.ndarray) -> None:
        """Keeps a selected frame's embedding for the dedup filter while later frames of its
        source can still be within the window of it.

        A copy of the row: a view would keep its whole batch's embeddings (N x 128
        float64 on the small CNN) alive. Views, 256 a source, kept with dedup off too,
        pin up to 16 MB for 512 rows of 1 KB at batch 32; a soak's scorer at 40 fps held
        4 MB of them under ``tracemalloc``."""
        recent = self._recent.setdefault(source, deque(maxlen=_RECENT_MAX))
        recent.append((frame, embedding.copy()))
        while recent and frame + 1 - recent[0][0] > self.params["dedup_window"]:
            recent.popleft()  # not within the window of the next frame, nor any later one

    def _is_duplicate(self, index: int) -> bool:
        batch = self._batch
        assert batch is not None and batch.unit is not None
        source = batch.source(index)
        recent = self._recent.get(source)
        if not recent:
            return False
        frame = self._frames.get(source, 0) + 1
        window = self.params["dedup_window"]
        while recent and frame - recent[0][0] > window:
            recent.popleft()
        if not recent:
            return False
        kept = self._unit(np.stack([e for _, e in recent]) - batch.mean)
        return bool((kept @ batch.unit[index]).max() >= self.params["dedup_similarity"])


class _BatchView:
    """One batch's context, prepared once."""

    def __init__(
        self, context: DecisionContext, mean: np.ndarray | None, n: int, pal: bool = False
    ) -> None:
        self.raw = None if context.embeddings is None else np.asarray(context.embeddings, float)
        self.mean = mean if mean is not None else 0.0
        self.unit = None if self.raw is None else StreamFilters._unit(self.raw - self.mean)
        # pal's unit rows (not centred), only when pal is on: the scorer's path pays nothing else
        self.unit_raw = None if self.raw is None or not pal else StreamFilters._unit(self.raw)
        self.weight = np.ones(n)  # the batch-wide (density) weighting
        self.pal_base: np.ndarray | None = None  # kernel counts of the frames asked for
        self.pal_gamma = 1.0
        self.pal_gain: np.ndarray | None = None  # the gains for those counts; None: stale
        p = context.probabilities
        self.probabilities = None if p is None else np.asarray(p, dtype=np.float64)
        self.predicted = None if p is None else np.asarray(p).argmax(axis=1)
        self.n_classes = 1 if p is None else max(1, np.asarray(p).shape[1])
        self.sources = context.sources
        self.suppressed: set[int] = set()
        self.n = n

    def source(self, index: int) -> str | None:
        return None if self.sources is None else self.sources[index]
