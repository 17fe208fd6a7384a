"""Pooling the seeds of label-efficiency runs: the same summary as one run over all seeds."""

import copy
from typing import Any

import numpy as np
import pytest

from winnow.bench.efficiency.errors import BenchConfigError
from winnow.bench.efficiency.merge import merge_results
from winnow.bench.efficiency.report import summarize
from winnow.bench.efficiency.run import RunResult

FULL = 0.913749  # more digits than a result keeps (4)


def _run(name: str, seed: int) -> RunResult:
    """A curve that rises at a rate set by the strategy and the seed, with noise."""
    rng = np.random.default_rng([seed, len(name)])
    rate = (0.05 if name == "random" else 0.08) * (1 + 0.3 * rng.random())
    labels = list(range(0, 61, 3))
    acc = [round(float(min(1.0, 0.3 + 0.7 * (1 - np.exp(-rate * n)))), 5) for n in labels]
    acc = [round(min(1.0, a + float(rng.normal(0, 0.01))), 5) for a in acc]
    return RunResult(
        name=name,
        seed=seed,
        labels=labels,
        accuracy=acc,
        balanced_accuracy=[round(a - 0.01, 5) for a in acc],
        recall=[[a, a] for a in acc],
        frames_seen=1000 + seed,
        rounds=3,
        refits=17,
        seconds=10.0 + seed,
    )


def _result(seeds: list[int]) -> dict[str, Any]:
    runs = {name: [_run(name, s) for s in seeds] for name in ("random", "default")}
    return {
        "dataset": "digits",
        "stream": {"frames": 1000},
        "video": False,
        "imbalance": None,
        "measure": "accuracy",
        "config": {
            "stream": {"dataset": "digits", "workers": 2},
            "run": {"max_labels": 60},
            "seeds": seeds,
            "full_seeds": 3,
            "workers": 2,
            "resamples": 300,
            "strategies": {"random": {"name": "random"}, "default": {}},
        },
        "full": {"mean": round(FULL, 4), "exact": FULL, "per_seed": [FULL], "seeds": [0]},
        "targets": {"0.95": round(0.95 * FULL, 4)},
        "strategies": summarize(runs, set(), FULL, "accuracy", 60, 300),
        "seconds": 5.0,
        "prepare_seconds": 1.0,
    }


def test_pooled_runs_summarize_as_one_run_over_all_seeds() -> None:
    whole = _result(list(range(8)))
    merged = merge_results([_result([0, 1, 2, 3, 4]), _result([5, 6, 7])], ["a.json", "b.json"])
    assert merged["strategies"] == whole["strategies"]
    assert merged["config"]["seeds"] == list(range(8))
    assert merged["merged_from"] == ["a.json", "b.json"]
    assert merged["full"] == whole["full"] and merged["targets"] == whole["targets"]
    # the pooled intervals are not either part's
    assert (
        merged["strategies"]["default"]["savings_ci"]
        != _result([5, 6, 7])["strategies"]["default"]["savings_ci"]
    )


def test_the_processes_a_run_used_do_not_stop_a_merge() -> None:
    other = _result([3, 4])
    other["config"]["stream"]["workers"] = 1
    assert merge_results([_result([0, 1, 2]), other], ["a", "b"])["config"]["seeds"] == [
        0,
        1,
        2,
        3,
        4,
    ]


def test_a_result_without_the_exact_reference_still_merges() -> None:
    old = _result([0, 1])
    del old["full"]["exact"]  # written before the unrounded mean was kept
    merged = merge_results([old, _result([2, 3])], ["old", "new"])
    assert [s["seed"] for s in merged["strategies"]["random"]["seeds"]] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda r: r["targets"].update({"0.95": 0.5}), "targets"),
        (lambda r: r["full"].update({"mean": 0.5}), "full"),
        (lambda r: r["config"]["run"].update({"max_labels": 90}), "config.run"),
        (lambda r: r["config"]["strategies"].update({"default": {"x": 1}}), "config.strategies"),
        (lambda r: r["config"]["stream"].update({"dataset": "other.npz"}), "config.stream"),
    ],
)
def test_runs_of_another_benchmark_are_refused(change: Any, named: str) -> None:
    other = copy.deepcopy(_result([2, 3]))
    change(other)
    with pytest.raises(BenchConfigError, match=rf"b.json is not a run .*{named}"):
        merge_results([_result([0, 1]), other], ["a.json", "b.json"])


def test_a_seed_in_two_runs_is_refused() -> None:
    with pytest.raises(BenchConfigError, match=r"seed 1 is in both a\.json and b\.json"):
        merge_results([_result([0, 1]), _result([1, 2])], ["a.json", "b.json"])


def test_one_run_is_not_a_merge() -> None:
    with pytest.raises(BenchConfigError, match="at least two"):
        merge_results([_result([0, 1])], ["a.json"])


def test_a_learner_setting_added_later_merges_at_its_default_only() -> None:
    old, new = _result([0, 1]), _result([2, 3])
    old["config"]["run"]["learner"] = {"round_labels": 20}  # before these settings
    learner = {
        "round_labels": 20,
        "class_balance": 0.0,
        "lr_schedule": None,
        "train_precision": "fp32",
        "refit_share": 0.0,
    }
    new["config"]["run"]["learner"] = learner
    merged = merge_results([old, new], ["old", "new"])
    assert merged["config"]["seeds"] == [0, 1, 2, 3]
    for changed in (
        {"lr_schedule": "cosine"},
        {"class_balance": 0.5},
        {"train_precision": "bf16"},
        {"refit_share": 0.01},  # refits at a share of the labels came after the old run
    ):
        new["config"]["run"]["learner"] = learner | changed
        with pytest.raises(BenchConfigError, match=r"new is not a run .*config\.run"):
            merge_results([old, new], ["old", "new"])
