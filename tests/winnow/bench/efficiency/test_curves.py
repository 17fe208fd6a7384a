"""The curve arithmetic of the label-efficiency bench, on answers worked out by hand."""

import math

import numpy as np
import pytest

from winnow.bench.efficiency import curves


def test_isotonic_pools_violators_into_their_mean() -> None:
    assert curves.isotonic([1, 3, 2, 4]).tolist() == [1, 2.5, 2.5, 4]
    assert curves.isotonic([3, 2, 1]).tolist() == [2, 2, 2]
    assert curves.isotonic([0.1, 0.2, 0.2, 0.9]).tolist() == [0.1, 0.2, 0.2, 0.9]


def test_isotonic_weights_the_pooled_mean() -> None:
    assert curves.isotonic([2, 0], weights=[3, 1]).tolist() == [1.5, 1.5]


def test_labels_to_target_interpolates_on_the_smoothed_curve() -> None:
    # isotonic: [0.1, 0.5, 0.85, 0.85]; 0.7 lies 0.2/0.35 of the way from 10 to 20 labels
    ltt = curves.labels_to_target([0, 10, 20, 30], [0.1, 0.5, 0.9, 0.8], 0.7)
    assert ltt == pytest.approx(10 + 0.2 / 0.35 * 10)


def test_a_lucky_spike_does_not_reach_the_target_early() -> None:
    # A running maximum would say 10 labels; isotonic regression averages the spike
    # at 10 with the dip after it, [0.5, 0.75, 0.75, 0.75, 0.96], and crosses 0.9
    # between 30 and 40 labels.
    ltt = curves.labels_to_target([0, 10, 20, 30, 40], [0.5, 0.95, 0.6, 0.7, 0.96], 0.9)
    assert ltt == pytest.approx(30 + 0.15 / 0.21 * 10)


def test_labels_to_target_censored_and_at_the_first_point() -> None:
    assert curves.labels_to_target([0, 10, 20], [0.1, 0.5, 0.6], 0.9) is None
    assert curves.labels_to_target([10, 20], [0.95, 0.97], 0.9) == 10
    assert curves.labels_to_target([], [], 0.9) is None


def test_value_at_interpolates_inside_the_curve_only() -> None:
    assert curves.value_at([0, 10, 20], [0.0, 0.5, 0.7], 15) == pytest.approx(0.6)
    assert curves.value_at([0, 10, 20], [0.0, 0.5, 0.7], 25) is None


def test_aulc_is_the_mean_measure_over_the_label_range() -> None:
    assert curves.aulc([0, 100], [0.0, 1.0], 100) == pytest.approx(0.5)
    assert curves.aulc([0, 50, 100], [1.0, 1.0, 1.0], 100) == pytest.approx(1.0)
    # a curve that stopped at 50 labels is held at its last value up to 100
    assert curves.aulc([0, 50], [0.0, 0.5], 100) == pytest.approx((0.25 * 50 + 0.5 * 50) / 100)
    # points past max_labels are not counted
    assert curves.aulc([0, 100, 200], [0.0, 1.0, 0.0], 100) == pytest.approx(0.5)


def test_savings_ratios_bound_censored_seeds_by_max_labels() -> None:
    ratios, censored_random, censored_strategy = curves.savings_ratios(
        [100, None, 50, None], [50, 25, None, None], bound=200, random_reached=[200] * 4
    )
    assert ratios == [2.0, 8.0, 0.25, 1.0]
    assert (censored_random, censored_strategy) == (2, 2)


def test_savings_ratios_bound_censored_random_by_the_labels_its_run_reached() -> None:
    # Random's stream ran out at 150 labels on the second seed: it is known to need
    # more than 150, not more than 200, so the ratio is 150/25, not 200/25.
    ratios, censored_random, _ = curves.savings_ratios(
        [100, None, None], [50, 25, 25], bound=200, random_reached=[200, 150, 200]
    )
    assert ratios == [2.0, 6.0, 8.0]
    assert censored_random == 2
    # a run can overshoot the budget by a batch; the bound stays the budget
    assert curves.savings_ratios([None], [25], bound=200, random_reached=[210])[0] == [8.0]


def test_geometric_mean_of_ratios() -> None:
    assert curves.geometric_mean([2, 0.5]) == pytest.approx(1.0)
    assert curves.geometric_mean([2, 8]) == pytest.approx(4.0)
    assert math.isnan(curves.geometric_mean([]))


def test_bootstrap_interval_is_seeded_and_brackets_the_statistic() -> None:
    values = [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 1.2, 2.2, 2.8, 3.5]
    low, high = curves.bootstrap_ci(values, curves.geometric_mean, resamples=2000, seed=0)
    assert curves.bootstrap_ci(values, curves.geometric_mean, 2000, seed=0) == (low, high)
    assert curves.bootstrap_ci(values, curves.geometric_mean, 2000, seed=1) != (low, high)
    assert min(values) < low < curves.geometric_mean(values) < high < max(values)
    assert curves.bootstrap_ci([2.0] * 5, curves.geometric_mean) == pytest.approx((2.0, 2.0))


def test_bootstrap_interval_of_two_values_spans_them() -> None:
    # Resampling two values: the mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4,
    # so the 2.5th and 97.5th percentiles are the two values themselves.
    assert curves.bootstrap_ci([0.0, 1.0], curves.mean, resamples=4000) == (0.0, 1.0)


def test_share_of_seeds_at_two_x() -> None:
    assert curves.share_at_least([1, 2, 3, 1.99], 2.0) == 0.5


def test_accuracy_balanced_accuracy_and_recall_from_confusion_counts() -> None:
    counts = curves.confusion(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1]), 3)
    assert counts.tolist() == [[2, 1, 0], [0, 1, 0], [0, 0, 0]]
    assert curves.accuracy(counts) == 0.75
    recall = curves.recalls(counts)
    assert recall[:2].tolist() == pytest.approx([2 / 3, 1.0])
    assert math.isnan(recall[2])  # no test frame of class 2: left out of the mean
    assert curves.balanced_accuracy(counts) == pytest.approx(5 / 6)


def test_a_stream_is_imbalanced_when_a_class_is_under_its_share_limit() -> None:
    assert curves.is_imbalanced([25, 75])  # 25% < 30% for two classes
    assert not curves.is_imbalanced([30, 70])
    assert not curves.is_imbalanced([129, 137, 123, 145, 128, 139, 135, 143, 136, 132])
    assert curves.is_imbalanced([2] + [10] * 9)  # 2% < 6% for ten classes


def test_the_sign_flip_test_is_exact_for_few_seeds() -> None:
    # every seed the same sign: only the two all-same patterns are as extreme
    assert curves.sign_flip_p([0.01] * 10) == pytest.approx(2 / 1024)
    assert curves.sign_flip_p([0.02, -0.02, 0.01, -0.01]) == 1.0
    assert curves.sign_flip_p([0.03, 0.01, 0.02, -0.01]) == pytest.approx(6 / 16)
    assert np.isnan(curves.sign_flip_p([]))


def test_the_sign_flip_test_draws_patterns_for_many_seeds() -> None:
    p = curves.sign_flip_p([0.01] * 30)
    assert 0 < p < 0.001  # the observed pattern counts, so never 0
    middling = curves.sign_flip_p(list(np.random.default_rng(0).normal(0, 1, 30)))
    assert middling == curves.sign_flip_p(list(np.random.default_rng(0).normal(0, 1, 30)))
    assert 0.05 < middling < 1


def test_holm_adjusts_step_down_and_keeps_order() -> None:
    adjusted = curves.holm([0.01, 0.04, 0.03, math.nan])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(adjusted[3])
    assert curves.holm([0.02, 0.9]) == pytest.approx([0.04, 0.9])
    assert curves.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert curves.holm([]) == []
