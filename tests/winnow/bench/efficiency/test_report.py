"""The summary of paired runs: savings with intervals, equal-budget comparisons, goals."""

import numpy as np
import pytest

from winnow.bench.efficiency.report import summarize, table
from winnow.bench.efficiency.run import RunResult

LABELS = [0, 10, 20, 30, 40]


def _run(name: str, seed: int, values: list[float]) -> RunResult:
    run = RunResult(name, seed)
    for count, value in zip(LABELS[: len(values)], values, strict=True):
        right = round(value * 100)
        # two classes, 100 test frames each: class 1 always right, class 0 at 2v - 1, so
        # accuracy and balanced accuracy are both v
        counts = np.array([[2 * right - 100, 200 - 2 * right], [0, 100]])
        run.record(count, counts)
    return run


RANDOM = [0.55, 0.6, 0.7, 0.9, 0.95]
GOOD = [0.55, 0.8, 0.95, 0.96, 0.97]
PEER = [0.55, 0.6, 0.8, 0.9, 0.95]


def _runs(good: list[list[float]]) -> dict[str, list[RunResult]]:
    seeds = range(len(good))
    return {
        "random": [_run("random", s, RANDOM) for s in seeds],
        "good": [_run("good", s, g) for s, g in zip(seeds, good, strict=True)],
        "peer": [_run("peer", s, PEER) for s in seeds],
    }


def test_a_strategy_that_halves_the_labels_of_every_seed() -> None:
    out = summarize(_runs([GOOD] * 4), {"peer"}, 1.0, "accuracy", 40, resamples=500)
    good, random = out["good"], out["random"]
    assert random["labels_to_target"]["0.95"] == {"median": 40.0, "censored": 0, "seeds": 4}
    assert good["labels_to_target"]["0.95"]["median"] == 20.0
    assert good["savings_vs_random"] == 2.0
    assert good["savings_ci"] == [2.0, 2.0]
    assert good["share_2x"] == 1.0
    # nobody reaches 98% within 40 labels: both censored, ratio 1 by convention
    assert good["savings"]["0.98"]["censored_strategy"] == 4
    assert good["savings"]["0.98"]["geometric_mean"] == 1.0
    assert random["savings_vs_random"] == 1.0
    assert good["goals"] == {
        "savings_2x": True,
        "savings_ci_above_1_5": True,
        "at_least_peers": True,
        "not_behind_peers": True,
    }
    assert "goals" not in out["peer"]
    # equal budgets: 10, 20 and 40 labels
    assert good["at_labels"]["10"]["mean"] == pytest.approx(0.8)
    assert good["vs_peers"]["peer"]["20"]["diff"] == pytest.approx(0.15)
    assert good["vs_peers"]["peer"]["40"]["diff"] == pytest.approx(0.02)
    assert good["aulc"] > random["aulc"]
    assert len(good["seeds"]) == 4 and good["seeds"][0]["labels"] == LABELS


def test_the_interval_widens_when_seeds_disagree() -> None:
    slow = [0.55, 0.6, 0.7, 0.9, 0.95]  # no better than random on this seed
    out = summarize(_runs([GOOD, GOOD, GOOD, slow]), {"peer"}, 1.0, "accuracy", 40, 500)
    good = out["good"]
    assert good["savings_vs_random"] == pytest.approx(2 ** (3 / 4), abs=1e-3)
    low, high = good["savings_ci"]
    assert low < good["savings_vs_random"] < high == 2.0
    assert good["share_2x"] == 0.75


def test_random_censored_where_its_stream_ran_out_counts_the_labels_it_reached() -> None:
    runs = _runs([GOOD] * 2)
    # the stream ran out for random at 30 labels, short of the 40 of the budget and of
    # the target: it is known to need more than 30 labels, not more than 40
    runs["random"][0] = _run("random", 0, RANDOM[:4])
    out = summarize(runs, {"peer"}, 1.0, "accuracy", 40, resamples=500)
    savings = out["good"]["savings"]["0.95"]
    assert savings["censored_random"] == 1
    assert savings["per_seed"] == [1.5, 2.0]


def test_balanced_accuracy_is_the_measure_when_asked() -> None:
    out = summarize(_runs([GOOD]), set(), 1.0, "balanced_accuracy", 40, 100)
    seed = out["good"]["seeds"][0]
    # class 1 always right, class 0 at 2v-1: balanced accuracy is v, recall of class 0 2v-1
    assert seed["measure"] == pytest.approx(GOOD)
    assert seed["recall"][1] == pytest.approx([0.6, 1.0])
    assert out["good"]["at_labels"]["40"]["recall"] == pytest.approx([0.94, 1.0])


def test_the_table_names_every_strategy() -> None:
    strategies = summarize(_runs([GOOD] * 2), {"peer"}, 1.0, "accuracy", 40, 100)
    text = table(
        {
            "measure": "accuracy",
            "targets": {"0.9": 0.9, "0.95": 0.95, "0.98": 0.98},
            "stream": {"name": "toy"},
            "video": False,
            "full": {"mean": 1.0},
            "strategies": strategies,
        }
    )
    assert "2.00x [2.00, 2.00]" in text
    for name in ("random", "good", "peer"):
        assert name in text
    # two seeds cannot make anything significant (p is at least 2 / 2^2)
    assert "good minus peer: 10 +0.200, 20 +0.150, 40 +0.020, aulc" in text
    assert "*" not in text.split("good minus peer:")[1].split("\n")[0]


def test_the_share_of_each_class_in_the_labels_is_averaged_over_seeds() -> None:
    """What a strategy sent for labeling, by true class, at equal label counts: each seed's
    last point at or under the count. Fails if the shares are taken from a later point
    than the count, or pooled as counts instead of averaged per seed."""
    counts = np.array([[50, 50], [0, 100]])
    runs = {name: [RunResult(name, 0), RunResult(name, 1)] for name in ("random", "good")}
    for run in runs["random"] + runs["good"]:
        run.record(0, counts)
    runs["random"][0].record(10, counts, [0] * 5 + [1] * 5)
    runs["random"][1].record(10, counts, [0] * 2 + [1] * 8)
    runs["random"][0].record(40, counts, [0] * 40)  # after 10 and 20: not read there
    runs["random"][1].record(40, counts, [1] * 40)
    for run in runs["good"]:
        run.record(10, counts, [0] * 10)
        run.record(40, counts, [0] * 30 + [1] * 10)
    out = summarize(runs, set(), 1.0, "accuracy", 40, resamples=100)
    assert out["random"]["at_labels"]["10"]["label_share"] == [0.35, 0.65]
    assert out["random"]["at_labels"]["20"]["label_share"] == [0.35, 0.65]
    assert out["random"]["at_labels"]["40"]["label_share"] == [0.5, 0.5]
    assert out["good"]["at_labels"]["40"]["label_share"] == [0.75, 0.25]
    assert out["random"]["seeds"][0]["label_counts"][1] == [5, 5]


def _noisy(rng: np.random.Generator, base: list[float], shift: float) -> list[float]:
    return [min(1.0, max(0.5, v + shift + rng.normal(0, 0.01))) for v in base]


def test_one_small_lag_among_many_comparisons_is_not_behind_a_peer() -> None:
    """``at_least_peers`` fails on any mean below the peer's, however small; the failure
    ``not_behind_peers`` catches: a lag that the seeds' noise explains, one comparison
    among several, read as being behind. A lag every seed shows still is."""
    rng = np.random.default_rng(0)
    seeds = range(10)
    runs = {
        "random": [_run("random", s, RANDOM) for s in seeds],
        "good": [_run("good", s, _noisy(rng, PEER, 0.0)) for s in seeds],
        "peer": [_run("peer", s, _noisy(rng, PEER, 0.0)) for s in seeds],
    }
    out = summarize(runs, {"peer"}, 1.0, "accuracy", 40, resamples=500)
    cells = out["good"]["vs_peers"]["peer"]
    assert set(cells) == {"10", "20", "40", "aulc"}
    assert all(0 < c["p"] <= c["p_holm"] <= 1 for c in cells.values())
    assert any(c["diff"] < 0 for c in cells.values())  # noise puts some below the peer
    assert out["good"]["goals"]["at_least_peers"] is False
    assert out["good"]["goals"]["not_behind_peers"] is True

    runs["good"] = [_run("good", s, _noisy(rng, PEER, -0.05)) for s in seeds]
    out = summarize(runs, {"peer"}, 1.0, "accuracy", 40, resamples=500)
    cells = out["good"]["vs_peers"]["peer"]
    assert cells["20"]["diff"] < 0 and cells["20"]["p_holm"] < 0.05
    assert out["good"]["goals"]["not_behind_peers"] is False
