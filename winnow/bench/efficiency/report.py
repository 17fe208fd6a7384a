"""From the runs' curves to the verdict: labels to target, savings with intervals, equal budgets.

Per strategy, over the paired seeds:

- ``labels_to_target``: per seed, the labels at which the isotonic fit of its
  curve reaches each target (90/95/98% of the full-data measure), censored
  seeds as null; summarized by the median (censored seeds count as above
  every measured one, so it is null when the middle seed is censored) and the
  number censored.
- ``savings``: per target, the geometric mean over seeds of random's labels
  over the strategy's (a censored random seed counted at the labels its run
  reached, a censored strategy seed at ``max_labels``; see :mod:`.curves`),
  its percentile-bootstrap interval over seeds and the share of seeds at 2x or
  more; ``savings_vs_random``, ``savings_ci`` and
  ``share_2x`` repeat the 95% target's.
- ``aulc``: the mean over seeds of the normalised area under the raw curve.
- ``at_labels``: the measure at equal label counts (a quarter, half and all of
  ``max_labels``), with per-class recall and each class's share of the labels learned
  from (``label_share``: what the strategy sent for labeling, by true class).
- ``vs_peers``: for a Winnow strategy, the paired difference to each
  scikit-activeml peer in the run at those counts and in AULC, with intervals, the
  sign-flip test's p-value (``p``) and Holm's adjustment of it over all of that
  strategy's comparisons with peers (``p_holm``).
- ``goals``: the issue's two tests, as booleans: ``at_least_peers`` (no mean difference
  below zero, however small) and ``not_behind_peers`` (none significantly below zero
  after Holm's adjustment, at 5 %).
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from winnow.bench.efficiency import curves
from winnow.bench.efficiency.run import RunResult

RATIOS = (0.9, 0.95, 0.98)
"""Targets, as fractions of the full-data measure."""
HEADLINE = 0.95
SIGNIFICANCE = 0.05
"""The level of ``not_behind_peers``: behind a peer where Holm's adjusted p is below it."""


def _round(value: float | None, digits: int = 4) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), digits)


def measure_of(run: RunResult, measure: str) -> list[float]:
    """The run's curve in the chosen measure."""
    return run.balanced_accuracy if measure == "balanced_accuracy" else run.accuracy


def checkpoints(max_labels: int) -> list[int]:
    """The label counts at which strategies are compared at equal budget."""
    return sorted({max(1, max_labels // 4), max(1, max_labels // 2), max_labels})


def _seed_entry(
    run: RunResult, values: list[float], targets: Mapping[float, float], max_labels: int
) -> dict[str, Any]:
    return {
        "seed": run.seed,
        "labels": run.labels,
        "measure": values,
        "accuracy": run.accuracy,
        "balanced_accuracy": run.balanced_accuracy,
        "recall": run.recall,
        "label_counts": run.label_counts,
        "labels_to_target": {
            str(r): _round(curves.labels_to_target(run.labels, values, t), 1)
            for r, t in targets.items()
        },
        "aulc": _round(curves.aulc(run.labels, values, max_labels)),
        "frames_seen": run.frames_seen,
        "rounds": run.rounds,
        "refits": run.refits,
        "seconds": run.seconds,
    }


def _mean_curve(seeds: list[dict[str, Any]]) -> tuple[list[int], list[float], list[float]]:
    """Mean and std over seeds on the label counts every seed measured."""
    grid = sorted(set.intersection(*(set(s["labels"]) for s in seeds))) if seeds else []
    table = np.array(
        [[s["measure"][s["labels"].index(x)] for x in grid] for s in seeds], dtype=np.float64
    )
    if not grid:
        return [], [], []
    return grid, table.mean(axis=0).round(4).tolist(), table.std(axis=0).round(4).tolist()


def _at(seed: dict[str, Any], count: int, key: str = "measure") -> float | None:
    return curves.value_at(seed["labels"], seed[key], count)


def _at_labels(seeds: list[dict[str, Any]], counts: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for count in counts:
        values = [v for s in seeds if (v := _at(s, count)) is not None]
        recall = []
        for s in seeds:
            if count < s["labels"][0] or count > s["labels"][-1]:
                continue
            per_class = np.array(s["recall"], dtype=np.float64)
            recall.append(
                [np.interp(count, s["labels"], per_class[:, c]) for c in range(per_class.shape[1])]
            )
        shares = [share for s in seeds if (share := _label_share(s, count)) is not None]
        out[str(count)] = {
            "mean": _round(float(np.mean(values))) if values else None,
            "std": _round(float(np.std(values))) if values else None,
            "seeds": len(values),
            "recall": np.nanmean(recall, axis=0).round(4).tolist() if recall else None,
            "label_share": np.mean(shares, axis=0).round(4).tolist() if shares else None,
        }
    return out


def _label_share(seed: dict[str, Any], count: int) -> list[float] | None:
    """Each class's share of the labels of the seed's last point at or under ``count``
    labels; None where the seed has no such point with labels, or predates the counts."""
    points = seed.get("label_counts") or []
    kept = [c for x, c in zip(seed["labels"], points, strict=False) if x <= count and sum(c)]
    if not kept:
        return None
    last = np.asarray(kept[-1], dtype=np.float64)
    return (last / last.sum()).tolist()


def _savings(
    random: list[dict[str, Any]],
    seeds: list[dict[str, Any]],
    ratio: float,
    max_labels: int,
    resamples: int,
) -> dict[str, Any]:
    key = str(ratio)
    ratios, cens_random, cens_strategy = curves.savings_ratios(
        [s["labels_to_target"][key] for s in random],
        [s["labels_to_target"][key] for s in seeds],
        max_labels,
        random_reached=[max(s["labels"], default=0) for s in random],
    )
    low, high = curves.bootstrap_ci(ratios, curves.geometric_mean, resamples)
    return {
        "geometric_mean": _round(curves.geometric_mean(ratios), 3),
        "ci": [_round(low, 3), _round(high, 3)],
        "share_2x": _round(curves.share_at_least(ratios, 2.0), 3),
        "per_seed": [round(r, 3) for r in ratios],
        "censored_random": cens_random,
        "censored_strategy": cens_strategy,
    }


def _labels_summary(seeds: list[dict[str, Any]], ratio: float) -> dict[str, Any]:
    values = [s["labels_to_target"][str(ratio)] for s in seeds]
    censored = sum(v is None for v in values)
    # Censored seeds sort last (above every measured count), so the median is defined
    # as long as fewer than half are censored.
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)
    middle = ordered[(len(ordered) - 1) // 2] if ordered else None
    return {"median": middle, "censored": censored, "seeds": len(values)}


def _paired(a: list[float | None], b: list[float | None], resamples: int) -> dict[str, Any]:
    diffs = [x - y for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    low, high = curves.bootstrap_ci(diffs, curves.mean, resamples)
    return {
        "diff": _round(float(np.mean(diffs))) if diffs else None,
        "ci": [_round(low), _round(high)],
        "p": _round(curves.sign_flip_p(diffs)),
    }


def _adjust_for_peers(vs_peers: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Adds ``p_holm`` to every comparison of one strategy with the peers: Holm's
    adjustment over all of them (each peer at each count and in AULC)."""
    cells = [cell for versus in vs_peers.values() for cell in versus.values()]
    raw = [math.nan if cell["p"] is None else cell["p"] for cell in cells]
    for cell, adjusted in zip(cells, curves.holm(raw), strict=True):
        cell["p_holm"] = _round(adjusted)


def _vs_peer(
    seeds: list[dict[str, Any]], peer: list[dict[str, Any]], counts: Sequence[int], resamples: int
) -> dict[str, Any]:
    out = {
        str(c): _paired([_at(s, c) for s in seeds], [_at(p, c) for p in peer], resamples)
        for c in counts
    }
    out["aulc"] = _paired([s["aulc"] for s in seeds], [p["aulc"] for p in peer], resamples)
    return out


def summarize(
    runs: Mapping[str, list[RunResult]],
    peers: set[str],
    full: float,
    measure: str,
    max_labels: int,
    resamples: int = 2000,
) -> dict[str, dict[str, Any]]:
    """Every strategy's entry of the JSON (``random`` must be among ``runs``).

    Args:
        runs: per strategy, its runs, one per seed, the same seeds for all.
        peers: the strategies that are scikit-activeml peers.
        full: the full-data measure the targets are fractions of.
        measure: ``accuracy`` or ``balanced_accuracy``.
        max_labels: the run's label budget (censoring bound, AULC range).
        resamples: bootstrap draws for every interval.
    """
    targets = {r: r * full for r in RATIOS}
    counts = checkpoints(max_labels)
    seeds_of = {
        name: [
            _seed_entry(run, measure_of(run, measure), targets, max_labels)
            for run in sorted(group, key=lambda r: r.seed)
        ]
        for name, group in runs.items()
    }
    random = seeds_of["random"]
    if [s["seed"] for s in random] != [s["seed"] for s in next(iter(seeds_of.values()))]:
        raise ValueError("every strategy needs the same seeds")
    out: dict[str, dict[str, Any]] = {}
    for name, seeds in seeds_of.items():
        grid, mean, std = _mean_curve(seeds)
        savings = {str(r): _savings(random, seeds, r, max_labels, resamples) for r in RATIOS}
        aulcs = [s["aulc"] for s in seeds if s["aulc"] is not None]
        headline = savings[str(HEADLINE)]
        entry: dict[str, Any] = {
            "peer": name in peers,
            "labels": grid,
            "measure_mean": mean,
            "measure_std": std,
            "labels_to_target": {str(r): _labels_summary(seeds, r) for r in RATIOS},
            "savings": savings,
            "savings_vs_random": headline["geometric_mean"],
            "savings_ci": headline["ci"],
            "share_2x": headline["share_2x"],
            "aulc": _round(float(np.mean(aulcs))) if aulcs else None,
            "aulc_std": _round(float(np.std(aulcs))) if aulcs else None,
            "at_labels": _at_labels(seeds, counts),
            "seconds": round(sum(s["seconds"] for s in seeds), 1),
            "seeds": seeds,
        }
        if name not in peers:
            entry["vs_peers"] = {
                p: _vs_peer(seeds, seeds_of[p], counts, resamples) for p in runs if p in peers
            }
            _adjust_for_peers(entry["vs_peers"])
            entry["goals"] = _goals(entry, headline)
        out[name] = entry
    return out


def _goals(entry: dict[str, Any], headline: dict[str, Any]) -> dict[str, bool | None]:
    low = headline["ci"][0]
    cells = [
        v for versus in entry["vs_peers"].values() for v in versus.values() if v["diff"] is not None
    ]
    behind = [v for v in cells if v["diff"] < 0 and v.get("p_holm") is not None]
    return {
        "savings_2x": (headline["geometric_mean"] or 0) >= 2.0,
        "savings_ci_above_1_5": low is not None and low > 1.5,
        "at_least_peers": (all(v["diff"] >= 0 for v in cells) if cells else None),
        "not_behind_peers": (
            not any(v["p_holm"] < SIGNIFICANCE for v in behind) if cells else None
        ),
    }


def table(result: Mapping[str, Any]) -> str:
    """The printed summary: one line per strategy, then the measure at equal label counts."""
    measure = result["measure"]
    targets = result["targets"]
    config = result.get("config", {}).get("run", {}).get("learner", {})
    pseudo = config.get("pseudo", 0)
    learner = f" pseudo-labels={pseudo:g}/label" if pseudo else ""
    # Shown when asked for on the command line (None: the trainer's default).
    for key in ("shrink", "perturb", "min_steps"):
        if config.get(key) is not None:
            learner += f" {key}={config[key]:g}"
    if config.get("lr_schedule") is not None:
        learner += f" lr_schedule={config['lr_schedule']}"
    if config.get("train_precision", "fp32") != "fp32":
        learner += f" train_precision={config['train_precision']}"
    lines = [
        f"dataset={result['stream']['name']} video={result['video']}{learner} measure={measure} "
        f"full={result['full']['mean']:.4f} targets 90/95/98%: "
        + "/".join(f"{targets[str(r)]:.4f}" for r in RATIOS),
        f"{'strategy':<28}{'final':>14}{'AULC':>8}{'labels→95%':>12}{'cens.':>7}"
        f"{'savings [95% CI]':>24}{'≥2x':>6}",
    ]
    for name, entry in result["strategies"].items():
        final = (
            f"{entry['measure_mean'][-1]:.3f}±{entry['measure_std'][-1]:.3f}"
            if entry["measure_mean"]
            else "-"
        )
        ltt = entry["labels_to_target"][str(HEADLINE)]
        median = f"{ltt['median']:.0f}" if ltt["median"] is not None else ">max"
        sav = entry["savings_vs_random"]
        low, high = entry["savings_ci"]
        savings = (
            f"{sav:.2f}x [{low:.2f}, {high:.2f}]" if sav is not None and low is not None else "-"
        )
        aulc = f"{entry['aulc']:.3f}" if entry["aulc"] is not None else "-"
        share = f"{entry['share_2x']:.0%}" if entry["share_2x"] is not None else "-"
        lines.append(
            f"{name:<28}{final:>14}{aulc:>8}{median:>12}{ltt['censored']:>4}/{ltt['seeds']:<2}"
            f"{savings:>24}{share:>6}"
        )
    counts = list(next(iter(result["strategies"].values()))["at_labels"])
    lines.append(f"{measure} at equal labels: " + ", ".join(counts))
    for name, entry in result["strategies"].items():
        cells = []
        for c in counts:
            at = entry["at_labels"][c]
            cells.append(f"{at['mean']:.3f}±{at['std']:.3f}" if at["mean"] is not None else "-")
        lines.append(f"  {name:<26}" + "".join(f"{cell:>16}" for cell in cells))
    for name, entry in result["strategies"].items():
        for peer, versus in entry.get("vs_peers", {}).items():
            cells = []
            for key, cell in versus.items():
                if cell["diff"] is None:
                    continue
                holm = cell.get("p_holm")
                mark = "*" if holm is not None and holm < SIGNIFICANCE else ""
                cells.append(f"{key} {cell['diff']:+.3f}{mark}")
            lines.append(f"  {name} minus {peer}: " + ", ".join(cells))
    if any("vs_peers" in entry for entry in result["strategies"].values()):
        lines.append(f"  (* Holm-adjusted sign-flip p below {SIGNIFICANCE} over the peers)")
    last = counts[-1]
    if result["measure"] == "balanced_accuracy":
        lines.append(f"per-class recall at {last} labels:")
        for name, entry in result["strategies"].items():
            recall = entry["at_labels"][last]["recall"] or []
            lines.append(f"  {name:<26}" + " ".join(f"{r:.3f}" for r in recall))
    lines.append(f"share of each class in the labels, at {counts[0]} and {last} labels:")
    for name, entry in result["strategies"].items():
        cells = []
        for c in (counts[0], last):
            share = entry["at_labels"][c].get("label_share")
            cells.append(" ".join(f"{v:.2f}" for v in share) if share else "-")
        lines.append(f"  {name:<26}" + " | ".join(cells))
    return "\n".join(lines)


def plot(result: Mapping[str, Any], path: Any) -> None:
    """The measure against labels, mean ± std bands; the full-data measure and 95% target dashed."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, entry in result["strategies"].items():
        x = np.array(entry["labels"])
        mean, std = np.array(entry["measure_mean"]), np.array(entry["measure_std"])
        style = ":" if entry["peer"] else ("--" if name == "random" else "-")
        (line,) = ax.plot(x, mean, style, label=name)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.axhline(result["full"]["mean"], color="grey", linestyle="--", label="all labels")
    ax.axhline(
        result["targets"][str(HEADLINE)], color="grey", linestyle=":", label="95% of all labels"
    )
    ax.set_xlabel("labels")
    ax.set_ylabel(result["measure"].replace("_", " "))
    kind = " (video bursts)" if result["video"] else ""
    ax.set_title(f"label efficiency on {Path(result['stream']['name']).stem}{kind}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
