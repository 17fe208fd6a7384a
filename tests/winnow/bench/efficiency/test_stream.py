"""Passes over the stream: paired by seed, bursts kept in order, asked frames left out."""

import numpy as np

from winnow.bench.efficiency.stream import StreamConfig, prepare, stream_pass


def test_a_pass_is_the_same_for_the_same_seed_and_skips_asked_frames() -> None:
    bursts = np.arange(50)
    first = stream_pass(bursts, np.random.default_rng(7), set(), video=False)
    assert sorted(first.tolist()) == list(range(50))
    again = stream_pass(bursts, np.random.default_rng(7), {3, 4}, video=False)
    assert again.tolist() == [i for i in first.tolist() if i not in (3, 4)]


def test_a_video_pass_keeps_each_burst_whole_and_in_order() -> None:
    bursts = np.repeat(np.arange(6), 3)
    order = stream_pass(bursts, np.random.default_rng(0), set(), video=True)
    assert sorted(order.tolist()) == list(range(18))
    for start in range(0, 18, 3):
        chunk = order[start : start + 3]
        assert chunk.tolist() == list(range(chunk[0], chunk[0] + 3))


def test_imbalanced_digits_are_measured_by_balanced_accuracy() -> None:
    balanced = prepare(StreamConfig(dataset="digits"))
    assert balanced.measure == "accuracy"
    skewed = prepare(StreamConfig(dataset="digits", imbalance=0.02, minority=3))
    assert skewed.measure == "balanced_accuracy"
    shares = skewed.info["class_shares"]
    assert shares[3] <= 0.02
    assert len(skewed.test_labels) == len(balanced.test_labels)
