"""Utility scores: how informative a frame's label would be, from its class probabilities.

Every score is vectorized over a batch ``p`` of shape (N, C) and normalized to
[0, 1], where 1 means most informative (the model is least sure) and 0 means
the model is certain. The query policies in :mod:`service.selection.policy` compare one
of these scores against a threshold.
"""

from collections.abc import Callable

import numpy as np

from schemas.api import ProbabilityUtilityName

Utility = Callable[[np.ndarray], np.ndarray]


def _as_probabilities(p: np.ndarray) -> np.ndarray:
    """Checks the shape and returns ``p`` as float64, clipped to [0, 1] against float error."""
    array = np.asarray(p, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(f"expected probabilities of shape (N, C) with C >= 1, got {array.shape}")
    return np.clip(array, 0.0, 1.0)


def least_confidence(p: np.ndarray) -> np.ndarray:
    """Normalized least confidence (Settles, Active Learning Literature Survey, 2009).

    ``u = (1 - max_k p_k) / (1 - 1/C)``: 0 for a one-hot prediction, 1 for the
    uniform one. With one class there is nothing to be unsure of and ``u = 0``.

    Args:
        p: class probabilities, shape (N, C).

    Returns:
        float64 array of shape (N,) in [0, 1].
    """
    p = _as_probabilities(p)
    n_classes = p.shape[1]
    if n_classes == 1:
        return np.zeros(len(p))
    utility = (1.0 - p.max(axis=1)) / (1.0 - 1.0 / n_classes)
    return np.clip(utility, 0.0, 1.0)


def margin(p: np.ndarray) -> np.ndarray:
    """Margin utility (Scheffer et al., Active Hidden Markov Models, 2001).

    ``u = 1 - (p_(1) - p_(2))`` where ``p_(1) >= p_(2)`` are the two largest
    probabilities: 1 when the top two tie, 0 for a one-hot prediction.

    Args:
        p: class probabilities, shape (N, C).

    Returns:
        float64 array of shape (N,) in [0, 1].
    """
    p = _as_probabilities(p)
    n_classes = p.shape[1]
    if n_classes == 1:
        return np.zeros(len(p))
    top = np.partition(p, (n_classes - 2, n_classes - 1), axis=1)
    utility = 1.0 - (top[:, -1] - top[:, -2])
    return np.clip(utility, 0.0, 1.0)


def entropy(p: np.ndarray) -> np.ndarray:
    """Normalized Shannon entropy (Settles 2009).

    ``u = -sum_k p_k log p_k / log C`` with ``0 log 0 = 0``: 0 for a one-hot
    prediction, 1 for the uniform one.

    Args:
        p: class probabilities, shape (N, C).

    Returns:
        float64 array of shape (N,) in [0, 1].
    """
    p = _as_probabilities(p)
    n_classes = p.shape[1]
    if n_classes == 1:
        return np.zeros(len(p))
    # log(1) = 0 stands in for log(0), so zero probabilities add exactly nothing
    plogp = p * np.log(np.where(p > 0.0, p, 1.0))
    utility = -plogp.sum(axis=1) / np.log(n_classes)
    return np.clip(utility, 0.0, 1.0)


UTILITIES: dict[ProbabilityUtilityName, Utility] = {
    "least_confidence": least_confidence,
    "margin": margin,
    "entropy": entropy,
}
"""Every utility by the name that settings and ``Scores`` use."""


def score_batch(p: np.ndarray) -> dict[str, np.ndarray]:
    """Computes every utility of ``UTILITIES`` for a batch of probabilities.

    Args:
        p: class probabilities, shape (N, C).

    Returns:
        Name to float64 array of shape (N,), each in [0, 1].
    """
    probabilities = _as_probabilities(p)
    return {name: utility(probabilities) for name, utility in UTILITIES.items()}
