"""Prequential accuracy, the stable holdout split and the release gate."""

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from trainer.evaluate import Prequential, accuracy, is_holdout, release_gate
from trainer.samples import Sample


def test_prequential_by_hand() -> None:
    meter = Prequential(window=3)
    assert meter.count == 0
    assert math.isnan(meter.accuracy) and math.isnan(meter.recent_accuracy)
    for outcome in (True, True, False, False, True):
        meter.update(outcome)
    assert meter.count == 5
    assert meter.accuracy == pytest.approx(3 / 5)
    assert meter.recent_accuracy == pytest.approx(1 / 3)  # False, False, True
    meter.update(True)
    assert meter.accuracy == pytest.approx(4 / 6)
    assert meter.recent_accuracy == pytest.approx(2 / 3)  # False, True, True
    with pytest.raises(ValueError):
        Prequential(window=0)


class _AlwaysClass(nn.Module):
    """Predicts one class for every input."""

    def __init__(self, predicted: int, classes: int = 3) -> None:
        super().__init__()
        self.predicted = predicted
        self.classes = classes

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        probs = torch.zeros(len(x), self.classes)
        probs[:, self.predicted] = 1.0
        return probs, torch.zeros(len(x), 4)


def test_accuracy_counts_top1_hits() -> None:
    samples = [
        Sample(f"f{i}", np.zeros((1, 8, 8), np.float32), label)
        for i, label in enumerate([0, 1, 1, 2, 1])
    ]
    device = torch.device("cpu")
    assert accuracy(_AlwaysClass(1), samples, device) == pytest.approx(3 / 5)
    assert accuracy(_AlwaysClass(2), samples, device) == pytest.approx(1 / 5)
    assert math.isnan(accuracy(_AlwaysClass(0), [], device))


def test_holdout_is_stable_and_close_to_the_fraction() -> None:
    ids = [f"cam-{i % 7}/frame-{i}" for i in range(10_000)]
    first = [is_holdout(frame_id, 0.1) for frame_id in ids]
    assert first == [is_holdout(frame_id, 0.1) for frame_id in ids]
    assert 0.09 < sum(first) / len(ids) < 0.11
    # A known id stays on its side in every process (sha1, not Python's salted hash).
    assert is_holdout("frame-0", 0.5) is False
    assert is_holdout("frame-1", 0.5) is True
    # A larger share keeps every frame of a smaller one.
    assert all(is_holdout(f, 0.2) for f, held in zip(ids, first, strict=True) if held)
    assert not any(is_holdout(f, 0.0) for f in ids[:100])
    assert all(is_holdout(f, 1.0) for f in ids[:100])


def test_gate_accepts_without_figures() -> None:
    assert release_gate(None, 0.9, 0.01).accepted
    assert "no holdout" in release_gate(None, 0.9, 0.01).reason
    decision = release_gate(0.5, None, 0.01)
    assert decision.accepted and math.isnan(decision.incumbent) and "incumbent" in decision.reason


def test_gate_accepts_within_the_margin_and_rejects_beyond_it() -> None:
    assert release_gate(0.95, 0.90, 0.01).accepted
    assert release_gate(0.89, 0.90, 0.02).accepted
    assert release_gate(0.90, 0.90, 0.0).accepted
    rejected = release_gate(0.85, 0.90, 0.02)
    assert not rejected.accepted
    assert (rejected.candidate, rejected.incumbent, rejected.margin) == (0.85, 0.90, 0.02)
    assert "below" in rejected.reason


def test_the_gate_margin_widens_for_a_small_holdout() -> None:
    from trainer.evaluate import release_gate

    # one frame worse out of 20 is noise: accepted; the same drop on 2000 frames is not
    assert release_gate(0.90, 0.95, 0.02, holdout_size=20).accepted
    assert not release_gate(0.90, 0.95, 0.02, holdout_size=2000).accepted
    assert release_gate(0.90, 0.95, 0.02, holdout_size=2000).margin == 0.02
