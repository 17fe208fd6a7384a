"""Small synthetic streams whose right answers are known: clusters, outliers, bursts."""

import numpy as np


def clusters(
    rng: np.random.Generator,
    n: int,
    weights: list[float],
    *,
    dim: int = 16,
    spread: float = 0.3,
    outliers: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` embeddings around ``len(weights)`` orthogonal centres (norm 4), a share
    ``outliers`` of them scattered far from every centre; labels (-1: outlier)."""
    centres = 4.0 * np.eye(dim)[: len(weights)]
    labels = rng.choice(len(weights), size=n, p=np.asarray(weights) / sum(weights))
    points = centres[labels] + rng.normal(0.0, spread, (n, dim))
    far = rng.random(n) < outliers
    points[far] = rng.normal(0.0, 4.0, (int(far.sum()), dim))
    labels[far] = -1
    return points, labels


def centres(dim: int, k: int) -> np.ndarray:
    return 4.0 * np.eye(dim)[:k]
