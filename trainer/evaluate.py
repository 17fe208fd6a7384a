"""How good a model is on the stream, and whether a new one may be released.

Prequential ("test, then train") accuracy scores each label against the
model's prediction before that label is learned, so it needs no held-out set
and tracks the stream as it changes. A held-out share of the labels, chosen
by a stable hash of the frame id so that restarts agree, gives the release
gate a yardstick: a candidate model is refused only when, on the same
held-out frames, it is significantly worse than the serving one (a paired
test) and worse by more than a margin.
"""

import hashlib
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from trainer.finetune import class_weights
from trainer.forward import predicted_classes
from trainer.samples import Sample


class Prequential:
    """Running accuracy of predictions made before each label was learned.

    Args:
        window: how many of the latest outcomes ``recent_accuracy`` covers.
    """

    def __init__(self, window: int = 200) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self._recent: deque[bool] = deque(maxlen=window)
        self._count = 0
        self._correct = 0

    def update(self, correct: bool) -> None:
        """Records one outcome."""
        self._count += 1
        self._correct += bool(correct)
        self._recent.append(bool(correct))

    @property
    def count(self) -> int:
        """Outcomes recorded in all."""
        return self._count

    @property
    def accuracy(self) -> float:
        """Share correct over all outcomes; NaN before the first."""
        return self._correct / self._count if self._count else math.nan

    @property
    def recent_accuracy(self) -> float:
        """Share correct over the last ``window`` outcomes; NaN before the first."""
        return sum(self._recent) / len(self._recent) if self._recent else math.nan


def accuracy(model: nn.Module, samples: Sequence[Sample], device: torch.device) -> float:
    """Top-1 accuracy of ``model`` on ``samples``; NaN for none."""
    if not samples:
        return math.nan
    predicted, labels = predicted_classes(model, samples, device)
    return float(np.mean(predicted == labels))


def is_holdout(frame_id: str, fraction: float) -> bool:
    """Whether a frame belongs to the held-out share ``fraction`` of all frames.

    Decided by the SHA-1 of the id, so the same frame lands on the same side
    in every process and after every restart.
    """
    if fraction <= 0.0:
        return False
    digest = hashlib.sha1(frame_id.encode("utf-8"), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def correct(model: nn.Module, samples: Sequence[Sample], device: torch.device) -> np.ndarray:
    """Per sample, whether ``model``'s top-1 class is the label: a boolean (N,) array."""
    if not samples:
        return np.zeros(0, dtype=bool)
    predicted, labels = predicted_classes(model, samples, device)
    return np.asarray(predicted == labels)


def mcnemar_worse_p(candidate: np.ndarray, incumbent: np.ndarray) -> float:
    """One-sided exact McNemar test that the candidate is worse than the incumbent.

    Only the frames where the two disagree carry evidence: ``b`` frames the
    incumbent gets right and the candidate wrong, ``c`` the other way round.
    Under the null hypothesis (equally good) ``b`` is Binomial(b + c, 1/2);
    the p-value is P(X >= b). McNemar (1947); the exact (binomial) form is the
    one to use on small holdouts.

    Args:
        candidate: per frame, whether the candidate is right.
        incumbent: per frame, whether the incumbent is right (same frames, same order).

    Returns:
        The p-value; 1.0 when the two never disagree.
    """
    candidate, incumbent = np.asarray(candidate, bool), np.asarray(incumbent, bool)
    if candidate.shape != incumbent.shape:
        raise ValueError(f"paired outcomes differ in shape: {candidate.shape} vs {incumbent.shape}")
    b = int(np.sum(incumbent & ~candidate))
    n = b + int(np.sum(candidate & ~incumbent))
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(b, n + 1))
    return min(1.0, tail / (1 << n))  # integers: 2.0**n overflows a float past n = 1,023


_EXACT_MAX = 200_000  # sums the exact weighted test enumerates at most
_DRAWS = 200_000  # sign flips drawn beyond that (seeded: the same outcomes, the same p)


def weighted_worse_p(candidate: np.ndarray, incumbent: np.ndarray, weights: np.ndarray) -> float:
    """One-sided paired sign-flip test that the candidate's weighted accuracy is worse.

    The weighted form of :func:`mcnemar_worse_p`: each frame where the two disagree
    contributes its weight, ``+w`` where only the incumbent is right and ``-w`` where only
    the candidate is; under the null hypothesis (equally good) each sign is a fair coin,
    and the p-value is the chance that the signed sum reaches the one observed. With
    equal weights it is the exact McNemar test. The weights take one value a class (see
    :func:`holdout_weights`), so the sum's distribution is a convolution of one binomial
    a weight, enumerated exactly while it has at most 200,000 values; beyond that it is
    estimated from 200,000 seeded draws (standard error about 0.0005 at p = 0.05).

    Args:
        candidate: per frame, whether the candidate is right.
        incumbent: per frame, whether the incumbent is right (same frames, same order).
        weights: per frame, its weight (non-negative; a class's weight, typically).

    Returns:
        The p-value; 1.0 when the two never disagree on a frame of positive weight.
    """
    candidate, incumbent = np.asarray(candidate, bool), np.asarray(incumbent, bool)
    weights = np.asarray(weights, dtype=np.float64)
    if not candidate.shape == incumbent.shape == weights.shape:
        raise ValueError(
            f"paired outcomes and weights differ in shape: {candidate.shape}, "
            f"{incumbent.shape}, {weights.shape}"
        )
    if (weights < 0).any() or not np.isfinite(weights).all():
        raise ValueError("weights must be finite and non-negative")
    disagree = (candidate != incumbent) & (weights > 0)
    if not disagree.any():
        return 1.0
    signs = np.where(incumbent[disagree], 1.0, -1.0)
    w = weights[disagree]
    observed = float(signs @ w)
    tolerance = 1e-9 * float(w.sum())
    values, counts = np.unique(w, return_counts=True)
    if float(np.prod(counts + 1.0)) <= _EXACT_MAX:
        sums = np.zeros(1)
        probs = np.ones(1)
        for value, m in zip(values, counts, strict=True):
            k = np.arange(m + 1)
            pmf = _half_binomial(int(m))  # in logs: comb(m, k) / 2**m overflows past m = 1,029
            sums = (sums[:, None] + value * (2 * k - m)[None, :]).ravel()
            probs = (probs[:, None] * pmf[None, :]).ravel()
        return float(min(1.0, probs[sums >= observed - tolerance].sum()))
    rng = np.random.default_rng(0)
    draws = np.zeros(_DRAWS)
    for value, m in zip(values, counts, strict=True):
        draws += value * (2 * rng.binomial(int(m), 0.5, size=_DRAWS) - int(m))
    return float((draws >= observed - tolerance).mean())


def _half_binomial(m: int) -> np.ndarray:
    """The Binomial(m, 1/2) probabilities of 0..m, computed in logs."""
    base = math.lgamma(m + 1) - m * math.log(2.0)
    logs = [base - math.lgamma(i + 1) - math.lgamma(m - i + 1) for i in range(m + 1)]
    return np.exp(np.array(logs))


def holdout_weights(labels: np.ndarray, power: float) -> np.ndarray | None:
    """Per held-out frame, its class's weight ``(n̄ / n_k) ** power`` over the holdout's
    class counts: the gate's weighted accuracy with power 1 is the balanced accuracy (the
    mean recall of the classes present). None when ``power`` is 0 or every class present
    has as many frames (plain accuracy then): the loss's :func:`~trainer.finetune.class_weights`
    over the holdout, a frame at a time."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return None
    weights = class_weights(labels, int(labels.max()) + 1, power)
    return None if weights is None else weights[labels].astype(np.float64)


@dataclass(frozen=True)
class GateDecision:
    """The release gate's verdict on a candidate model.

    Attributes:
        accepted: whether the candidate may be released.
        candidate: the candidate's holdout accuracy (NaN when unknown).
        incumbent: the serving model's holdout accuracy (NaN when unknown).
        margin: how much worse than the incumbent a candidate may be.
        reason: the verdict in words, for logs and the release manifest.
        p_value: the paired test's p-value that the candidate is worse (NaN when untested).
    """

    accepted: bool
    candidate: float
    incumbent: float
    margin: float
    reason: str
    p_value: float = math.nan


def release_gate(
    candidate: np.ndarray | None,
    incumbent: np.ndarray | None,
    margin: float,
    alpha: float = 0.05,
    weights: np.ndarray | None = None,
) -> GateDecision:
    """Refuses a candidate only when it is significantly worse *and* worse by more than ``margin``.

    Both models are scored on the same current holdout, frame by frame, and
    compared with a paired test (:func:`mcnemar_worse_p`). A handful of
    held-out frames cannot make a candidate significantly worse, so a perfect
    incumbent score on a small holdout never stalls learning; on a large
    holdout a clearly worse candidate is refused.

    Args:
        candidate: per held-out frame, whether the candidate is right; None or
            empty when there is no holdout yet.
        incumbent: the same for the serving model; None when none is serving.
        margin: how much lower the candidate's accuracy may be in any case.
        alpha: the significance level of the one-sided test.
        weights: per held-out frame, its weight (:func:`holdout_weights`: the trainer's
            class balance); the accuracies are then weighted (with power 1, balanced) and
            the test is :func:`weighted_worse_p`, so a candidate that trades a few frames of
            a common class for a rare class's is judged as the loss that trained it weighs
            them. None: plain accuracy and the exact McNemar test.
    """
    if candidate is None or len(candidate) == 0:
        return GateDecision(True, math.nan, math.nan, margin, "no holdout accuracy yet")
    what = "accuracy" if weights is None else "class-weighted accuracy"
    cand = _mean(candidate, weights)
    if incumbent is None or len(incumbent) == 0:
        return GateDecision(True, cand, math.nan, margin, "no incumbent accuracy to compare with")
    inc = _mean(incumbent, weights)
    if weights is None:
        p, test = mcnemar_worse_p(candidate, incumbent), "McNemar"
    else:
        p, test = weighted_worse_p(candidate, incumbent, weights), "weighted sign-flip test"
    n = len(candidate)
    if inc - cand > margin and p < alpha:
        reason = (
            f"candidate {what} {cand:.4f} is below incumbent {inc:.4f} by more than "
            f"{margin:.4f} on {n} held-out frames, and significantly "
            f"({test} p={p:.3g} < {alpha:g})"
        )
        return GateDecision(False, cand, inc, margin, reason, p)
    if inc - cand > margin:
        why = f"not significantly worse ({test} p={p:.3g} >= {alpha:g})"
    else:
        why = f"within {margin:.4f} or better"
    reason = f"candidate {what} {cand:.4f} vs incumbent {inc:.4f} on {n} held-out frames: {why}"
    return GateDecision(True, cand, inc, margin, reason, p)


def _mean(right: np.ndarray, weights: np.ndarray | None) -> float:
    right = np.asarray(right, dtype=np.float64)
    if weights is None:
        return float(np.mean(right))
    if len(weights) != len(right):
        raise ValueError(f"{len(weights)} weights for {len(right)} held-out frames")
    return float(np.average(right, weights=weights))
