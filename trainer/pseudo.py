"""What the unlabeled frames lend: labels spread over the backbone's embedding graph.

A stream shows the trainer far more frames than anyone labels. Label spreading
(Zhou et al., NIPS 2003, "Learning with local and global consistency"; on deep
embeddings as in Iscen et al., CVPR 2019) spreads each label along a graph that
joins every frame to its nearest neighbours in embedding space, so a label
speaks for the cluster it sits in. The unlabeled frames it labels most
confidently, the same number per class and at most ``per_label`` times the
labels, join a round or a head refit as pseudo-labels.

Why it helps active learning more than random sampling: an uncertainty
strategy asks for frames near the decision boundary, which say little about
the dense middle of each class; spreading fills that middle in. Labels drawn
at random already sit mostly in the middle.

Cost: a k-nearest-neighbour search over at most ``max_frames`` embeddings
(blocks of ``BLOCK`` rows of a float32 similarity product, O(N^2 D)), then
``iterations`` sparse products of N x k entries: 0.3 s for 1,300 frames of 64-d
embeddings and 1.1 s for 4,096, measured on a core shared with a running
benchmark, plus the forward passes that embed the frames.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy import sparse

from trainer.architectures import WinnowNet
from trainer.forward import forward_samples
from trainer.samples import Sample

BLOCK = 1024
"""Rows of the similarity matrix computed at a time."""

UNLABELED = -1
"""The label an unlabeled sample carries; :func:`pseudo_samples` never reads it."""

SIMILARITY_POWER = 3
"""Edge weight: the cosine similarity to this power (Iscen et al.'s gamma), so the
closest neighbours dominate."""


@dataclass(frozen=True)
class SpreadConfig:
    """How labels are spread and how many pseudo-labels are taken.

    Attributes:
        per_label: pseudo-labels taken per label at most (0: none).
        neighbours: k of the k-nearest-neighbour graph.
        alpha: how far labels spread (0: not at all; towards 1: further).
        iterations: spreading steps.
        max_frames: the newest frames considered at most (labeled ones always are).
    """

    per_label: float = 3.0
    neighbours: int = 10
    alpha: float = 0.9
    iterations: int = 30
    max_frames: int = 4096

    def __post_init__(self) -> None:
        if self.per_label < 0:
            raise ValueError(f"per_label must not be negative, got {self.per_label}")
        if self.neighbours < 1 or self.iterations < 1 or self.max_frames < 1:
            raise ValueError("neighbours, iterations and max_frames must be at least 1")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"alpha must be in [0, 1), got {self.alpha}")


class LabelGraph:
    """The k-nearest-neighbour graph of a set of frames' embeddings, built once.

    The embeddings depend on the backbone alone, so one graph serves every
    head refit until the next backbone round; spreading the labels over it
    (:meth:`spread`) costs ``iterations`` sparse products, milliseconds.

    Args:
        embeddings: (N, D) embeddings of the frames.
        frame_ids: the frames' ids, in the same order.
        config: the graph's ``neighbours``.
        samples: the frames by id, for :func:`pseudo_labeled` to copy.

    Raises:
        ValueError: mismatched shapes or repeated frame ids.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        frame_ids: Sequence[str],
        config: SpreadConfig = SpreadConfig(),
        samples: Mapping[str, Sample] | None = None,
    ) -> None:
        x = np.asarray(embeddings, dtype=np.float32)
        self.samples = dict(samples or {})
        if x.ndim != 2 or len(x) != len(frame_ids):
            raise ValueError(f"need (N, D) embeddings and N frame ids, got {x.shape}")
        self.frame_ids = list(frame_ids)
        self.rows = {frame_id: row for row, frame_id in enumerate(self.frame_ids)}
        if len(self.rows) != len(self.frame_ids):
            raise ValueError("frame ids repeat")
        n = len(x)
        if n < 2:
            self._walk = sparse.csr_matrix((n, n))
            return
        affinity = _knn_graph(x, min(config.neighbours, n - 1))
        degree = np.asarray(affinity.sum(axis=1)).ravel()
        inverse_root = sparse.diags(1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)))
        self._walk = (inverse_root @ affinity @ inverse_root).tocsr()

    def __len__(self) -> int:
        return len(self.frame_ids)

    def spread(
        self,
        labeled: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        config: SpreadConfig = SpreadConfig(),
    ) -> np.ndarray:
        """(N, C) class scores of every frame, each row summing to 1, or 0 where no label
        reaches.

        Args:
            labeled: (L,) rows that are labeled.
            labels: (L,) their class indices in ``[0, num_classes)``.
            num_classes: C.
            config: ``alpha`` and ``iterations``.

        Raises:
            ValueError: mismatched shapes, a row or a label out of range.
        """
        rows = np.asarray(labeled, dtype=np.int64)
        y = np.asarray(labels, dtype=np.int64)
        n = len(self.frame_ids)
        if len(rows) != len(y):
            raise ValueError(f"need one label per labeled row, got {len(rows)} and {len(y)}")
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise ValueError("a labeled row is out of range")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"labels must be in [0, {num_classes})")
        seeds = np.zeros((n, num_classes), dtype=np.float64)
        seeds[rows, y] = 1.0
        scores = seeds.copy()
        if len(rows):
            for _ in range(config.iterations):
                scores = config.alpha * (self._walk @ scores) + (1 - config.alpha) * seeds
        return _normalized(scores)


def spread(
    embeddings: np.ndarray,
    labeled: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    config: SpreadConfig = SpreadConfig(),
) -> np.ndarray:
    """:meth:`LabelGraph.spread` on a graph of ``embeddings`` built for this one call."""
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"need (N, D) embeddings, got {x.shape}")
    graph = LabelGraph(x, [str(i) for i in range(len(x))], config)
    return graph.spread(labeled, labels, num_classes, config)


def _knn_graph(x: np.ndarray, k: int) -> sparse.csr_matrix:
    """Symmetric k-nearest-neighbour affinities: cosine similarity (clipped at 0) cubed."""
    centred = x - x.mean(axis=0)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    unit = centred / np.where(norms > 0, norms, 1.0)
    n = len(unit)
    cols = np.empty((n, k), dtype=np.int64)
    weights = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, BLOCK):
        sim = unit[start : start + BLOCK] @ unit.T
        block = np.arange(start, min(start + BLOCK, n))
        sim[block - start, block] = -np.inf  # not its own neighbour
        nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        cols[block] = nearest
        weights[block] = np.maximum(np.take_along_axis(sim, nearest, axis=1), 0) ** SIMILARITY_POWER
    graph = sparse.csr_matrix(
        (weights.ravel(), (np.repeat(np.arange(n), k), cols.ravel())), shape=(n, n)
    )
    return (graph + graph.T).tocsr()


def _normalized(scores: np.ndarray) -> np.ndarray:
    total = scores.sum(axis=1, keepdims=True)
    return np.divide(scores, total, out=np.zeros_like(scores), where=total > 0)


def pick(scores: np.ndarray, candidates: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """The most confident candidate rows, ``budget // C`` per class at most, with their classes.

    A row whose scores are all 0 (no label reached it) is never picked; a class
    with fewer confident rows than its share leaves the rest unused, so the
    pseudo-labels stay as balanced as the labels allow.

    Returns:
        (rows, classes), both (M,) int64, in class order.
    """
    num_classes = scores.shape[1]
    share = budget // num_classes if num_classes else 0
    candidates = np.asarray(candidates, dtype=np.int64)
    reached = candidates[scores[candidates].sum(axis=1) > 0]
    if share <= 0 or not len(reached):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    predicted = scores[reached].argmax(axis=1)
    confidence = scores[reached].max(axis=1)
    rows, classes = [], []
    for cls in range(num_classes):
        mine = np.flatnonzero(predicted == cls)
        best = mine[np.argsort(-confidence[mine], kind="stable")[:share]]
        rows.append(reached[best])
        classes.append(np.full(len(best), cls, dtype=np.int64))
    return np.concatenate(rows), np.concatenate(classes)


def label_graph(
    model: WinnowNet,
    frames: Sequence[Sample],
    config: SpreadConfig = SpreadConfig(),
    device: torch.device | None = None,
) -> LabelGraph:
    """The graph of the newest ``max_frames`` of ``frames`` (oldest first; a frame id given
    twice counts at its last place), embedded by ``model``'s backbone in eval mode."""
    # A frame given twice keeps its last place: the labeled frames, given last, are kept.
    unique = list({s.frame_id: s for s in reversed(frames)}.values())[::-1]
    unique = unique[-config.max_frames :]
    if not unique:
        return LabelGraph(np.zeros((0, model.embedding_dim), np.float32), [], config)
    (embeddings,), _ = forward_samples(model.backbone, unique, device or torch.device("cpu"))
    ids = [s.frame_id for s in unique]
    return LabelGraph(embeddings, ids, config, dict(zip(ids, unique, strict=True)))


def pseudo_labeled(
    graph: LabelGraph,
    labeled: Sequence[Sample],
    num_classes: int,
    config: SpreadConfig = SpreadConfig(),
) -> list[Sample]:
    """The graph's unlabeled frames with the labels spreading gives them, at most
    ``per_label`` per label (:func:`pick`).

    Labels of frames the graph does not hold still count towards the number
    taken but cannot spread; labeled frames are never pseudo-labeled.
    """
    budget = int(config.per_label * len(labeled))
    if budget <= 0 or not len(graph):
        return []
    known = [(graph.rows[s.frame_id], s.label) for s in labeled if s.frame_id in graph.rows]
    if not known:
        return []
    rows = np.array([row for row, _ in known], dtype=np.int64)
    scores = graph.spread(rows, np.array([label for _, label in known]), num_classes, config)
    candidates = np.setdiff1d(np.arange(len(graph)), rows)
    picked, classes = pick(scores, candidates, budget)
    return [
        replace(graph.samples[graph.frame_ids[r]], label=int(c))
        for r, c in zip(picked, classes, strict=True)
    ]


def pseudo_samples(
    model: WinnowNet,
    labeled: Sequence[Sample],
    unlabeled: Sequence[Sample],
    config: SpreadConfig = SpreadConfig(),
    device: torch.device | None = None,
) -> list[Sample]:
    """Unlabeled frames with the labels that spreading gives them, at most ``per_label`` each.

    One call of :func:`label_graph` over the labeled frames and the unlabeled
    ones (the newest ``max_frames`` in all) and :func:`pseudo_labeled`; build the
    graph once per backbone instead where many calls share one.

    Args:
        model: the model whose backbone embeds the frames.
        labeled: the labeled samples.
        unlabeled: samples whose ``label`` is ignored, oldest first.
        config: the graph, the spreading and the number taken.
        device: where the backbone runs; the CPU if None.
    """
    if int(config.per_label * len(labeled)) <= 0 or not unlabeled:
        return []
    known = {s.frame_id for s in labeled}
    pool = [s for s in unlabeled if s.frame_id not in known]
    keep = max(config.max_frames - len(labeled), 0)
    frames = [*(pool[len(pool) - keep :] if keep else []), *labeled]
    graph = label_graph(model, frames, replace(config, max_frames=len(frames) or 1), device)
    return pseudo_labeled(graph, labeled, model.num_classes, config)
