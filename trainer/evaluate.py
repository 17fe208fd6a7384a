"""How good a model is on the stream, and whether a new one may be released.

Prequential ("test, then train") accuracy scores each label against the
model's prediction before that label is learned, so it needs no held-out set
and tracks the stream as it changes. A held-out share of the labels, chosen
by a stable hash of the frame id so that restarts agree, gives the release
gate a fixed yardstick: a candidate model is released only when it is not
worse than the serving one by more than a margin.
"""

import hashlib
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from trainer.finetune import predict_proba
from trainer.samples import Sample, stack


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
    inputs, labels = stack(samples)
    predicted = predict_proba(model, inputs, device).argmax(axis=1)
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


@dataclass(frozen=True)
class GateDecision:
    """The release gate's verdict on a candidate model.

    Attributes:
        accepted: whether the candidate may be released.
        candidate: the candidate's holdout accuracy (NaN when unknown).
        incumbent: the serving model's holdout accuracy (NaN when unknown).
        margin: how much worse than the incumbent a candidate may be.
        reason: the verdict in words, for logs and the release manifest.
    """

    accepted: bool
    candidate: float
    incumbent: float
    margin: float
    reason: str


def release_gate(
    candidate_acc: float | None,
    incumbent_acc: float | None,
    margin: float,
    holdout_size: int | None = None,
) -> GateDecision:
    """Accepts a candidate unless it is worse than the incumbent by more than ``margin``.

    With no holdout figure for either model yet (no held-out labels, or no
    model serving), there is nothing to compare and the candidate is accepted.
    With ``holdout_size``, the margin is at least two standard errors of the
    difference of two accuracies measured on that many frames
    (``2 * sqrt(2 p (1 - p) / n)``), so that a small holdout's noise alone does
    not block a model; as the holdout grows the configured margin takes over.
    """
    candidate = math.nan if candidate_acc is None else float(candidate_acc)
    incumbent = math.nan if incumbent_acc is None else float(incumbent_acc)
    if holdout_size and not math.isnan(incumbent):
        p = min(max(incumbent, 0.0), 1.0)
        margin = max(margin, 2 * math.sqrt(2 * p * (1 - p) / holdout_size))
    if math.isnan(candidate):
        return GateDecision(True, candidate, incumbent, margin, "no holdout accuracy yet")
    if math.isnan(incumbent):
        return GateDecision(
            True, candidate, incumbent, margin, "no incumbent accuracy to compare with"
        )
    if candidate >= incumbent - margin:
        reason = (
            f"candidate accuracy {candidate:.4f} is within {margin:.4f} "
            f"of incumbent {incumbent:.4f} or better"
        )
        return GateDecision(True, candidate, incumbent, margin, reason)
    reason = (
        f"candidate accuracy {candidate:.4f} is below incumbent {incumbent:.4f} "
        f"by more than {margin:.4f}"
    )
    return GateDecision(False, candidate, incumbent, margin, reason)
