"""Pooling the seeds of label-efficiency runs of one benchmark into one result.

A run over further seeds (``--first-seed``) of the same stream, strategies and learner
has the same full-data reference (computed on seeds 0, 1, ...), hence the same targets;
its seeds are pooled with an earlier run's and every summary (savings and their
intervals, AULC, the comparisons at equal labels) is computed again over all of them,
exactly as one run over all the seeds would have computed it.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from winnow.bench.efficiency.errors import BenchConfigError
from winnow.bench.efficiency.report import summarize
from winnow.bench.efficiency.run import RunResult

SAME = ("dataset", "stream", "video", "imbalance", "measure", "targets")
"""Keys of a result that every merged run must share (and the full-data reference's)."""

SAME_CONFIG = ("stream", "run", "strategies", "full_seeds", "resamples")
"""Keys of a result's ``config`` that every merged run must share."""

LEARNER_ADDED = {
    "class_balance": 0.0,
    "lr_schedule": None,
    "train_precision": "fp32",
    "refit_share": 0.0,
}
"""Learner settings added after the first results, with what a result without one ran
(an unweighted loss; the trainer's rate schedule; float32 rounds; a head refit every
``refit_labels`` whatever the count, so ``--refit-share 0`` runs more seeds of it)."""


def _run_of(name: str, seed: Mapping[str, Any]) -> RunResult:
    return RunResult(
        name=name,
        seed=int(seed["seed"]),
        labels=list(seed["labels"]),
        accuracy=list(seed["accuracy"]),
        balanced_accuracy=list(seed["balanced_accuracy"]),
        recall=[list(r) for r in seed["recall"]],
        label_counts=[list(c) for c in seed.get("label_counts", [])],  # added later
        frames_seen=int(seed["frames_seen"]),
        rounds=int(seed["rounds"]),
        refits=int(seed["refits"]),
        seconds=float(seed["seconds"]),
    )


def _benchmark(result: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two results runs of one benchmark, by the name to report it under."""
    config = result.get("config", {})
    full = {k: v for k, v in result.get("full", {}).items() if k != "exact"}  # added later
    stream = {k: v for k, v in config.get("stream", {}).items() if k != "workers"}
    run = dict(config.get("run", {}))
    if "learner" in run:  # settings added later: a result without one ran at LEARNER_ADDED
        run["learner"] = LEARNER_ADDED | run["learner"]
    return (
        {k: result.get(k) for k in SAME}
        | {"full": full}
        | {f"config.{k}": config.get(k) for k in SAME_CONFIG}
        | {"config.stream": stream}  # how many processes ran it does not change a curve
        | {"config.run": run}
    )


def _differences(first: Mapping[str, Any], other: Mapping[str, Any]) -> list[str]:
    mine, theirs = _benchmark(first), _benchmark(other)
    return [k for k in mine if mine[k] != theirs[k]]


def merge_results(results: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """One result with the seeds of all ``results`` (each a label-efficiency JSON).

    Args:
        results: the runs, in the order given; the first one's settings are kept.
        names: where each came from, for the messages and the record.

    Raises:
        BenchConfigError: fewer than two runs, runs of different benchmarks (stream,
            strategies, learner, full-data reference) or a seed in two of them.
    """
    if len(results) < 2:
        raise BenchConfigError("--merge needs at least two result files")
    first = results[0]
    for name, other in zip(names[1:], results[1:], strict=True):
        differ = _differences(first, other)
        if differ:
            raise BenchConfigError(
                f"{name} is not a run of the same benchmark as {names[0]}: "
                f"{', '.join(differ)} differ"
            )
    runs: dict[str, list[RunResult]] = {name: [] for name in first["strategies"]}
    owner: dict[int, str] = {}
    for name, result in zip(names, results, strict=True):
        seeds = [int(s["seed"]) for s in result["strategies"]["random"]["seeds"]]
        for seed in seeds:
            if seed in owner:
                raise BenchConfigError(f"seed {seed} is in both {owner[seed]} and {name}")
            owner[seed] = name
        for strategy, entry in result["strategies"].items():
            runs[strategy] += [_run_of(strategy, s) for s in entry["seeds"]]
    config = dict(first["config"])
    peers = {name for name, entry in first["strategies"].items() if entry.get("peer")}
    full = first["full"]
    strategies = summarize(
        runs,
        peers,
        float(full.get("exact", full["mean"])),  # results before 2026-12-06 kept it rounded
        str(first["measure"]),
        int(config["run"]["max_labels"]),
        int(config.get("resamples", 2000)),
    )
    config["seeds"] = sorted(owner)
    return {
        **{k: first[k] for k in SAME},
        "full": first["full"],
        "config": config,
        "strategies": strategies,
        "seconds": round(sum(float(r.get("seconds", 0.0)) for r in results), 1),
        "prepare_seconds": round(sum(float(r.get("prepare_seconds", 0.0)) for r in results), 1),
        "merged_from": [str(Path(n)) for n in names],
    }
