"""Prequential accuracy, the stable holdout split and the release gate."""

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from trainer.evaluate import (
    Prequential,
    accuracy,
    holdout_weights,
    is_holdout,
    mcnemar_worse_p,
    release_gate,
    weighted_worse_p,
)
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


def _paired(n: int, both: int, only_incumbent: int, only_candidate: int):
    """Per-frame outcomes of two models on the same ``n`` frames."""
    candidate = np.zeros(n, bool)
    incumbent = np.zeros(n, bool)
    candidate[:both] = incumbent[:both] = True
    incumbent[both : both + only_incumbent] = True
    start = both + only_incumbent
    candidate[start : start + only_candidate] = True
    return candidate, incumbent


def test_gate_accepts_without_figures() -> None:
    assert release_gate(None, np.ones(5, bool), 0.01).accepted
    assert "no holdout" in release_gate(None, np.ones(5, bool), 0.01).reason
    decision = release_gate(np.ones(5, bool), None, 0.01)
    assert decision.accepted and math.isnan(decision.incumbent) and "incumbent" in decision.reason


def test_a_perfect_incumbent_on_a_small_holdout_does_not_block_a_candidate() -> None:
    # The demo's stall: 14/14 against 13/14 is one disagreement, p = 0.5.
    candidate, incumbent = _paired(14, 13, 1, 0)
    decision = release_gate(candidate, incumbent, 0.02)
    assert decision.accepted and decision.p_value == 0.5
    assert "not significantly worse" in decision.reason
    # Even 11/14 against 14/14 (three disagreements, p = 1/8) is not evidence enough.
    assert release_gate(*_paired(14, 11, 3, 0), 0.02).accepted


def test_a_clearly_worse_candidate_on_a_large_holdout_is_refused() -> None:
    candidate, incumbent = _paired(400, 330, 45, 5)  # 0.8375 against 0.9375
    decision = release_gate(candidate, incumbent, 0.02)
    assert not decision.accepted and decision.p_value < 1e-6
    assert (decision.candidate, decision.incumbent) == (0.8375, 0.9375)
    assert "significantly" in decision.reason


def test_a_significant_but_small_drop_within_the_margin_is_accepted() -> None:
    # 10 disagreements all against the candidate on 2000 frames: significant, but 0.5 points.
    decision = release_gate(*_paired(2000, 1800, 10, 0), 0.02)
    assert decision.accepted and decision.p_value < 0.01


def test_mcnemar_is_the_exact_binomial_tail_on_disagreements() -> None:
    assert mcnemar_worse_p(*_paired(10, 10, 0, 0)) == 1.0
    assert mcnemar_worse_p(*_paired(20, 0, 3, 0)) == 1 / 8
    assert mcnemar_worse_p(*_paired(20, 0, 0, 3)) == 1.0  # the candidate is better
    # b = 6 of n = 8: P(X >= 6) = (28 + 8 + 1) / 256
    assert mcnemar_worse_p(*_paired(20, 0, 6, 2)) == 37 / 256
    with pytest.raises(ValueError):
        mcnemar_worse_p(np.ones(3, bool), np.ones(4, bool))
    # A holdout with more than 1,023 disagreements (2.0 ** n overflowed): 560 of 1,100 against
    # the candidate, P(X >= 560) for Binomial(1100, 1/2), by the normal approximation ~0.28.
    p = mcnemar_worse_p(*_paired(1100, 0, 560, 540))
    assert p == pytest.approx(
        0.5 * math.erfc((559.5 - 550) / math.sqrt(275) / math.sqrt(2)), abs=0.005
    )


def test_the_weighted_test_with_equal_weights_is_the_exact_mcnemar_test() -> None:
    for outcomes in (_paired(20, 0, 3, 0), _paired(20, 0, 6, 2), _paired(30, 10, 4, 9)):
        assert weighted_worse_p(*outcomes, np.full(len(outcomes[0]), 0.7)) == pytest.approx(
            mcnemar_worse_p(*outcomes), abs=1e-12
        )
    assert weighted_worse_p(*_paired(10, 10, 0, 0), np.ones(10)) == 1.0
    # A frame of weight 0 carries no evidence.
    candidate, incumbent = _paired(4, 0, 1, 0)
    assert weighted_worse_p(candidate, incumbent, np.array([0.0, 1, 1, 1])) == 1.0
    with pytest.raises(ValueError):
        weighted_worse_p(np.ones(3, bool), np.ones(3, bool), np.ones(4))
    with pytest.raises(ValueError):
        weighted_worse_p(np.ones(3, bool), np.ones(3, bool), np.array([1.0, -1, 1]))


def test_the_weighted_test_enumerates_the_signed_sums() -> None:
    # Only the incumbent is right on a frame of weight 3; only the candidate on two of weight 1.
    # Observed sum 3 - 1 - 1 = 1; of the 8 sign patterns (+-3 +-1 +-1) the four with +3
    # reach it (5, 3, 3, 1), none with -3 -> 1/2. Unweighted (McNemar: 1 of 3) it is 7/8.
    candidate = np.array([False, True, True])
    incumbent = np.array([True, False, False])
    assert weighted_worse_p(candidate, incumbent, np.array([3.0, 1, 1])) == pytest.approx(1 / 2)
    assert mcnemar_worse_p(candidate, incumbent) == 7 / 8


def test_the_sampled_weighted_test_agrees_with_the_exact_one() -> None:
    # 10 classes, about 24 disagreements each: some 25 ** 10 sums, past the exact enumeration.
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(10), 40)
    steps = 3 + labels  # integer weights, so the reference below can count sums exactly
    incumbent = rng.random(400) < 0.5
    candidate = incumbent.copy()
    flip = rng.random(400) < 0.6
    candidate[flip] = ~incumbent[flip]
    sampled = weighted_worse_p(candidate, incumbent, steps / 3.0)
    # Reference: the exact distribution of the signed sum, by counting over integer sums.
    disagree = candidate != incumbent
    observed = int(np.where(incumbent[disagree], 1, -1) @ steps[disagree])
    total = int(steps[disagree].sum())
    counts = np.zeros(2 * total + 1)
    counts[total] = 1.0
    for step in steps[disagree]:
        counts = 0.5 * (np.roll(counts, step) + np.roll(counts, -step))
    exact = float(counts[observed + total :].sum())
    assert 0.01 < exact < 0.99
    assert sampled == pytest.approx(exact, abs=0.005)
    assert weighted_worse_p(candidate, incumbent, steps / 3.0) == sampled  # seeded


def test_the_weighted_test_takes_a_large_holdout() -> None:
    # 1,500 disagreements of one weight and one of another: exact enumeration (3,002 sums), where
    # comb(1500, k) / 2 ** 1500 would overflow a float.
    candidate = np.zeros(1501, bool)
    incumbent = np.zeros(1501, bool)
    incumbent[:780] = True  # 780 frames only the incumbent gets right, 720 only the candidate
    candidate[780:1500] = True
    incumbent[1500] = True
    weights = np.ones(1501)
    weights[1500] = 2.0
    p = weighted_worse_p(candidate, incumbent, weights)
    # The same sum by counting over integers (weights 1 and 2), as in the test above.
    steps = weights.astype(int)
    observed, total = 780 - 720 + 2, 1502
    counts = np.zeros(2 * total + 1)
    counts[total] = 1.0
    for step in steps:
        counts = 0.5 * (np.roll(counts, step) + np.roll(counts, -step))
    assert p == pytest.approx(float(counts[observed + total :].sum()), rel=1e-9)
    assert 0.05 < p < 0.1


def test_holdout_weights_make_the_weighted_accuracy_balanced() -> None:
    labels = np.array([0] * 8 + [1] * 2)
    weights = holdout_weights(labels, 1.0)
    assert weights is not None
    right = np.array([True] * 8 + [True, False])  # recall 1.0 and 0.5
    assert np.average(right, weights=weights) == pytest.approx(0.75)
    assert holdout_weights(labels, 0.0) is None
    assert holdout_weights(np.array([0, 1, 1, 0]), 1.0) is None  # already balanced
    assert holdout_weights(np.array([], dtype=np.int64), 1.0) is None


def test_a_class_weighted_gate_judges_the_rare_class_as_the_loss_does() -> None:
    """Without the weights the gate would refuse a class-balanced candidate for what its
    loss asked of it: a few more errors on the common class, the rare class found."""
    labels = np.array([0] * 380 + [1] * 20)
    incumbent = np.ones(400, bool)
    incumbent[380:] = False  # never finds the rare class: plain 0.95, balanced 0.5
    candidate = np.ones(400, bool)
    candidate[:40] = False  # 40 common-class errors, the rare class found but 3 frames
    candidate[380:383] = False
    plain = release_gate(candidate, incumbent, 0.02)
    assert not plain.accepted  # 0.8925 against 0.95 and significantly
    weights = holdout_weights(labels, 1.0)
    weighted = release_gate(candidate, incumbent, 0.02, weights=weights)
    assert weighted.accepted and "class-weighted accuracy" in weighted.reason
    assert weighted.candidate == pytest.approx((340 / 380 + 17 / 20) / 2)
    assert weighted.incumbent == pytest.approx(0.5)
    # And a candidate that loses the rare class is refused by the weighted gate.
    lost = release_gate(incumbent, candidate, 0.02, weights=weights)
    assert not lost.accepted and "weighted sign-flip test" in lost.reason
