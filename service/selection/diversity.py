"""Windowed batch selection for high frame rates: which k frames of a window to label.

The threshold strategy and the budget say how many frames of a window
(a scorer batch) may be labeled, ``k``; these selectors say which:

- ``coreset`` — k-center greedy on embeddings (Sener and Savarese, "Active
  learning for convolutional neural networks: a core-set approach", ICLR
  2018): repeatedly take the frame farthest from every centre, the centres
  being recent selections and the picks so far,
  ``x = argmax_i min_j ||e_i - c_j||``.
- ``badge`` — k-means++ seeding in gradient-embedding space (Ash et al.,
  "Deep batch active learning by diverse, uncertain gradient lower bounds",
  ICLR 2020): ``g_i = (p_i - onehot(ŷ_i)) ⊗ e_i``, the gradient of the
  cross-entropy at the predicted label with respect to the last layer; the
  first pick has the largest ``||g||``, each next one is drawn with
  probability ``∝ min_j ||g_i - g_j||²``.
"""

from collections import deque
from collections.abc import Sequence
from typing import get_args

import numpy as np

from schemas.api import SelectorName

SELECTORS: tuple[SelectorName, ...] = get_args(SelectorName)
"""``none`` (frame by frame, no selector) and the selectors :class:`WindowSelector` runs."""


def k_center_greedy(points: np.ndarray, k: int, centers: np.ndarray | None = None) -> list[int]:
    """Indices of ``k`` points chosen by k-center greedy (Sener and Savarese 2018)."""
    n = len(points)
    k = min(k, n)
    if k <= 0:
        return []
    if centers is not None and len(centers):
        dist = np.min(((points[:, None, :] - centers[None, :, :]) ** 2).sum(-1), axis=1)
    else:
        dist = np.full(n, np.inf)
        first = int(np.argmax((points**2).sum(axis=1)))  # no centre yet: the farthest from 0
        dist = np.minimum(dist, ((points - points[first]) ** 2).sum(axis=1))
        picks = [first]
        return picks + _greedy(points, dist, k - 1, picks)
    return _greedy(points, dist, k, [])


def _greedy(points: np.ndarray, dist: np.ndarray, k: int, taken: list[int]) -> list[int]:
    picks: list[int] = []
    dist = dist.copy()
    dist[taken] = -1.0
    for _ in range(k):
        i = int(np.argmax(dist))
        if dist[i] < 0:
            break
        picks.append(i)
        dist = np.minimum(dist, ((points - points[i]) ** 2).sum(axis=1))
        dist[[*taken, *picks]] = -1.0
    return picks


def gradient_embeddings(probabilities: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """BADGE's ``(p - onehot(argmax p)) ⊗ e`` for every frame: (N, C·D)."""
    p = np.asarray(probabilities, dtype=np.float64)
    e = np.asarray(embeddings, dtype=np.float64)
    residual = p.copy()
    residual[np.arange(len(p)), p.argmax(axis=1)] -= 1.0
    return (residual[:, :, None] * e[:, None, :]).reshape(len(p), -1)


def kmeans_pp(points: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """k-means++ seeding as BADGE uses it (first pick: the largest norm)."""
    n = len(points)
    k = min(k, n)
    if k <= 0:
        return []
    picks = [int(np.argmax((points**2).sum(axis=1)))]
    dist = ((points - points[picks[0]]) ** 2).sum(axis=1)
    while len(picks) < k:
        total = dist.sum()
        if total <= 0:
            rest = [i for i in range(n) if i not in picks]
            picks.extend(rest[: k - len(picks)])
            break
        i = int(rng.choice(n, p=dist / total))
        picks.append(i)
        dist = np.minimum(dist, ((points - points[i]) ** 2).sum(axis=1))
    return picks


class WindowSelector:
    """Chooses which frames of a batch to label; keeps recent picks as core-set centres."""

    def __init__(self, name: str = "coreset", memory: int = 256) -> None:
        if name not in SELECTORS or name == "none":
            known = ", ".join(s for s in SELECTORS if s != "none")
            raise ValueError(f"unknown selector {name!r} (known: {known})")
        self.name: SelectorName = name
        self._centers: deque[np.ndarray] = deque(maxlen=memory)

    def pick(
        self,
        k: int,
        eligible: Sequence[int],
        embeddings: np.ndarray,
        probabilities: np.ndarray | None,
        rng: np.random.Generator,
    ) -> list[int]:
        """``k`` batch indices among ``eligible``."""
        eligible = list(eligible)
        if k <= 0 or not eligible:
            return []
        emb = np.asarray(embeddings, dtype=np.float64)[eligible]
        if self.name == "badge" and probabilities is not None:
            chosen = kmeans_pp(
                gradient_embeddings(np.asarray(probabilities)[eligible], emb), k, rng
            )
        else:
            centers = np.stack(self._centers) if self._centers else None
            chosen = k_center_greedy(emb, k, centers)
        picked = [eligible[i] for i in chosen]
        self._centers.extend(np.asarray(embeddings, dtype=np.float64)[picked])
        return picked
