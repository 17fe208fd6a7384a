"""``winnow bench drift``: the drift detectors against River baselines, Alibi Detect's protocol.

A small CNN is fine-tuned on 70 % of the dataset's training split; its outputs
on the frames it did not see (the other 30 % and the test split) are computed
once, undrifted and under each shift. Each of ``references`` draws splits
those frames at random into a reference of ``reference_frames`` (at most half;
the scorer's default anchor is 1,000 frames) and a pool that the streams are
resampled from, builds the drift reference and calibrates the detectors on
it, as the scorer does. Spreading the runs over reference draws measures what
an ERT promises: the expected run length over streams and references alike.
A single reference of a few hundred frames is off the true distribution by
its own sampling error, so one deployment's run length is spread around the
ERT; ``run_length_by_reference`` gives that spread (10th, 50th, 90th
percentile of the per-draw means).

- ``mean_run_length``: mean frames to the first alarm over undrifted runs
  (compare with ``ert``; runs are cut at ``20 ert`` and then count as that long);
- per shift, runs of ``change_at`` undrifted frames followed by drifted ones; a
  detector resets after an alarm and the first alarm at or after the change
  gives the delay (frames of drifted data seen); ``detected_fraction`` is the
  share of runs with an alarm within ``ert`` frames of the change,
  ``mean_delay`` and ``median_delay`` are over those;
- ``combined``: the scorer's detectors together, each calibrated to
  (detectors x ERT) so that the first alarm from any of them comes every ERT
  frames: the row to compare with a single baseline at the same false-alarm rate.

Baselines on the max-probability stream, calibrated by simulation on the
held-out frames to the same ERT: River's ADWIN (its ``delta``) and
Page-Hinkley (its ``threshold``). Alibi Detect itself does not install next to
numpy 2 (0.13 pins numpy<2, Pillow<11, numba<0.60), so it is not run.
"""

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas.drift import DriftReference
from service.drift import Rows, Simulation, build_detectors
from service.drift.detectors import Detector
from winnow.bench.drift_data import SHIFTS, HeldOut, held_out, shift_stream
from winnow.datasets import load_dataset

# -- baselines --------------------------------------------------------------------------------


class _RiverBaseline:
    """A River detector on the max-probability stream, calibrated to an ERT."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.param = 0.0

    def make(self) -> Any:
        from river.drift import ADWIN, PageHinkley

        if self.name == "adwin":
            return ADWIN(delta=self.param)
        return PageHinkley(threshold=self.param, min_instances=30)

    def first_alarms(self, streams: np.ndarray, start: int = 0) -> np.ndarray:
        """First alarm at or after ``start`` in each stream (its length if none)."""
        out = np.full(len(streams), streams.shape[1])
        for r, stream in enumerate(streams):
            detector = self.make()
            for t, value in enumerate(stream.tolist()):
                detector.update(value)
                if detector.drift_detected and t >= start:
                    out[r] = t
                    break
        return out

    def calibrate(self, pool: np.ndarray, ert: int, rng: np.random.Generator, runs: int) -> None:
        streams = pool[rng.integers(len(pool), size=(runs, 3 * ert))]
        # More alarms with a larger ADWIN delta, fewer with a larger PH threshold. ADWIN's
        # bound is so cautious that even delta near 1 gives runs of about 5 ERT on a
        # max-probability stream; River takes a delta above 1 (a looser bound), and up to
        # about 10 its false alarms grow with it, so that is the range searched.
        lo, hi = (
            (np.log(1e-6), np.log(10.0)) if self.name == "adwin" else (np.log(0.01), np.log(50))
        )
        for _ in range(12):
            mid = 0.5 * (lo + hi)
            self.param = float(np.exp(mid))
            first = self.first_alarms(streams) + 1
            alarms = (first <= streams.shape[1]).sum()
            mean = first.sum() / max(1, alarms)
            longer = mean > ert
            if self.name == "adwin":
                lo, hi = (mid, hi) if longer else (lo, mid)
            else:
                lo, hi = (lo, mid) if longer else (mid, hi)
        self.param = float(np.exp(0.5 * (lo + hi)))


# -- the protocol -----------------------------------------------------------------------------


@dataclass
class _Tally:
    """First alarms of one detector (or baseline) over all reference draws."""

    window: int | None = None
    first: list[np.ndarray] = field(default_factory=list)  # undrifted runs, per draw
    shifts: dict[str, list[np.ndarray]] = field(default_factory=dict)


def _our_first_alarms(detector: Detector, pool: Rows, index: np.ndarray, start: int) -> np.ndarray:
    """Streaming runs with resets: the first alarm at or after ``start`` per run."""
    out = np.full(len(index), index.shape[1])
    for r, row in enumerate(index):
        live = detector.fresh()
        stream = pool.take(row)
        for first in range(0, len(row), 64):
            hits = [first + i for i, _ in live.update(stream.take(slice(first, first + 64)))]
            hits = [h for h in hits if h >= start]
            if hits:
                out[r] = hits[0]
                break
    return out


def _undrifted_first_alarms(detector: Detector, pool: Rows, index: np.ndarray) -> np.ndarray:
    """The first alarm of each undrifted run (index.shape[1] when none)."""
    trajectories = detector.trajectories(pool, index)
    return (np.maximum.accumulate(trajectories, axis=1) <= detector.threshold).sum(axis=1)


def _summary(first: np.ndarray, start: int, horizon: int) -> dict[str, float | None]:
    delay = first - start + 1
    hit = delay <= horizon
    return {
        "mean_delay": float(delay[hit].mean()) if hit.any() else None,
        "median_delay": float(np.median(delay[hit])) if hit.any() else None,
        "detected_fraction": float(hit.mean()),
    }


def run_drift_bench(
    dataset: str = "digits",
    ert: int = 1000,
    runs: int = 100,
    seed: int = 0,
    embedding_window: int = 64,
    class_window: int = 200,
    shifts: tuple[str, ...] = SHIFTS,
    baselines: bool = True,
    references: int = 20,
    reference_frames: int = 1000,
    progress: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Runs the benchmark; returns the JSON-ready result."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    data = load_dataset(dataset)
    held = held_out(data, shifts, seed, progress)
    n = len(held.labels)
    n_ref = min(reference_frames, n // 2)
    # Undrifted streams are resampled from the frames left after the reference: that
    # finite pool is off the true distribution by its own sampling error, as the reference
    # is, so calibration is told the error of both together (1/n = 1/reference + 1/pool).
    n_cal = max(2, round(1 / (1 / n_ref + 1 / (n - n_ref))))
    plan = _Plan(
        ert=ert,
        runs=max(1, -(-runs // references)),
        change_at=max(embedding_window, class_window),
        windows=(embedding_window, class_window),
        reference_frames=n_ref,
        calibration_frames=n_cal,
        shifts=shifts,
    )
    rivals = _calibrated_baselines(held, ert, rng, runs, progress) if baselines else []
    tallies: dict[str, _Tally] = {}
    for draw in range(references):
        thresholds = _draw(plan, held, rivals, tallies, seed + draw, rng)
        progress(f"reference draw {draw + 1}/{references}: thresholds {thresholds}")
    return {
        "dataset": data.name,
        "ert": ert,
        "runs": plan.runs * references,
        "references": references,
        "change_at": plan.change_at,
        "horizon": plan.horizon,
        "embedding_window": embedding_window,
        "class_window": class_window,
        "reference_frames": n_ref,
        "stream_pool_frames": n - n_ref,
        "calibration_reference_frames": n_cal,
        "alibi_detect": "not run: alibi-detect 0.13 requires numpy<2 (this project has numpy 2)",
        "seconds": round(time.perf_counter() - started, 1),
        "detectors": {name: _result(name, tally, plan, rivals) for name, tally in tallies.items()},
    }


@dataclass(frozen=True)
class _Plan:
    """What every reference draw does."""

    ert: int
    runs: int  # per draw and case
    change_at: int
    windows: tuple[int, int]  # embedding, class mix
    reference_frames: int
    calibration_frames: int
    shifts: tuple[str, ...]

    @property
    def cap(self) -> int:
        """Undrifted runs end here, counted as this long."""
        return 20 * self.ert

    @property
    def horizon(self) -> int:
        """Drifted frames after the change; an alarm later than this is a miss."""
        return self.ert


def _draw(
    plan: _Plan,
    held: HeldOut,
    rivals: list["_RiverBaseline"],
    tallies: dict[str, "_Tally"],
    seed: int,
    rng: np.random.Generator,
) -> str:
    """One reference draw: calibrates on it, runs every case, adds the first alarms to
    ``tallies``; returns the thresholds, for the progress line."""
    order = rng.permutation(len(held.labels))
    ref_rows, pool_rows = order[: plan.reference_frames], order[plan.reference_frames :]
    none = held.embeddings["none"], held.probabilities["none"]
    reference = DriftReference.build(none[0][ref_rows], none[1][ref_rows], seed=seed)
    single = build_detectors(
        reference, embedding_window=plan.windows[0], class_window=plan.windows[1]
    )
    simulation = Simulation(
        single,
        Rows.reference_pool(reference),
        plan.ert,
        seed,
        reference_frames=plan.calibration_frames,
    )
    simulation.apply(simulation.thresholds(plan.ert))
    joint = [d.fresh() for d in single]
    for detector, threshold in zip(joint, simulation.together(plan.ert), strict=True):
        detector.threshold = threshold
    clean = held.rows(reference, "none", pool_rows)
    index = rng.integers(len(pool_rows), size=(plan.runs, plan.cap))
    first = {d.name: _undrifted_first_alarms(d, clean.rows, index) for d in single}
    first["combined"] = np.min([_undrifted_first_alarms(d, clean.rows, index) for d in joint], 0)
    for baseline in rivals:
        first[baseline.name] = baseline.first_alarms(clean.confidence[index])
    for name, value in first.items():
        tallies.setdefault(name, _Tally(window=_window(name, single))).first.append(value + 1)
    for shift in plan.shifts:
        stream, index = shift_stream(
            shift, held, reference, clean, pool_rows, rng, plan.runs, plan.change_at, plan.horizon
        )
        start = plan.change_at
        first = {d.name: _our_first_alarms(d, stream.rows, index, start) for d in single}
        first["combined"] = np.min(
            [_our_first_alarms(d, stream.rows, index, start) for d in joint], 0
        )
        for baseline in rivals:
            first[baseline.name] = baseline.first_alarms(stream.confidence[index], start)
        for name, value in first.items():
            tallies[name].shifts.setdefault(shift, []).append(value)
    return ", ".join(f"{d.name} {d.threshold:.4g}" for d in single)


def _window(name: str, detectors: list[Detector]) -> int | None:
    return next((d.window for d in detectors if d.name == name), None)


def _result(
    name: str, tally: "_Tally", plan: _Plan, rivals: list["_RiverBaseline"]
) -> dict[str, Any]:
    """One detector's (or baseline's) figures over all reference draws."""
    cap = plan.cap
    per_reference = [float(np.minimum(f, cap).mean()) for f in tally.first]
    everything = np.concatenate(tally.first)
    baseline = next((b for b in rivals if b.name == name), None)
    return {
        "kind": _kind(name, baseline),
        "ert": plan.ert,
        "window": tally.window,
        "parameter": baseline.param if baseline else None,
        "mean_run_length": float(np.minimum(everything, cap).mean()),
        # runs of one draw share a reference, so the error of the mean is taken over draws
        "mean_run_length_se": float(np.std(per_reference, ddof=1) / np.sqrt(len(per_reference)))
        if len(per_reference) > 1
        else None,
        "censored_runs": int((everything > cap).sum()),
        "run_length_by_reference": {
            "p10": float(np.quantile(per_reference, 0.1)),
            "median": float(np.median(per_reference)),
            "p90": float(np.quantile(per_reference, 0.9)),
        },
        "shifts": {
            shift: _summary(np.concatenate(firsts), plan.change_at, plan.horizon)
            for shift, firsts in tally.shifts.items()
        },
    }


def _kind(name: str, baseline: "_RiverBaseline | None") -> str:
    if baseline is not None:
        return "baseline (river, max probability)"
    if name == "combined":
        return "winnow: an alarm from any detector, the detectors calibrated together to the ERT"
    return "winnow"


def _calibrated_baselines(
    held: HeldOut,
    ert: int,
    rng: np.random.Generator,
    runs: int,
    progress: Callable[[str], None],
) -> list["_RiverBaseline"]:
    """River's detectors calibrated on the held-out frames' confidence to ``ert``."""
    confidence = held.probabilities["none"].max(axis=1)
    rivals = []
    for name in ("adwin", "page_hinkley"):
        baseline = _RiverBaseline(name)
        t = time.perf_counter()
        baseline.calibrate(confidence, ert, rng, runs=max(30, runs // 3))
        progress(
            f"calibrated {name}: parameter {baseline.param:.4g} in {time.perf_counter() - t:.1f}s"
        )
        rivals.append(baseline)
    return rivals


def format_table(result: dict[str, Any]) -> str:
    shifts = list(next(iter(result["detectors"].values()))["shifts"])
    head = f"{'detector':<14} {'ERT':>6} {'run len':>12} {'p10-p90':>11} " + " ".join(
        f"{s[:11]:>17}" for s in shifts
    )
    lines = [
        f"drift bench on {result['dataset']}: {result['runs']} runs per case over "
        f"{result['references']} reference draws of {result['reference_frames']} frames, change "
        f"after {result['change_at']} frames; per shift: mean/median delay (detected %)",
        head,
        "-" * len(head),
    ]
    for name, r in result["detectors"].items():
        cells = []
        for s in shifts:
            x = r["shifts"][s]
            if x["mean_delay"] is None:
                cells.append(f"{'-':>10} ({0:>3.0f}%)")
            else:
                share = 100 * x["detected_fraction"]
                cells.append(f"{x['mean_delay']:>5.0f}/{x['median_delay']:<4.0f}({share:>3.0f}%)")
        spread, se = r["run_length_by_reference"], r["mean_run_length_se"]
        run = f"{r['mean_run_length']:.0f}" + (f"±{se:.0f}" if se is not None else "")
        lines.append(
            f"{name:<14} {r['ert']:>6} {run:>12} "
            f"{spread['p10']:>5.0f}-{spread['p90']:<5.0f} " + " ".join(f"{c:>17}" for c in cells)
        )
    return "\n".join(lines)


def run_drift_bench_command(args: argparse.Namespace) -> int:
    """The ``winnow bench drift`` command."""

    def progress(message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    result = run_drift_bench(
        dataset=args.dataset,
        ert=args.ert,
        runs=args.runs,
        seed=args.seed,
        embedding_window=args.embedding_window,
        class_window=args.class_window,
        shifts=tuple(s.strip() for s in args.shifts.split(",") if s.strip()),
        baselines=not args.no_baselines and _has_river(),
        references=args.references,
        reference_frames=args.reference_frames,
        progress=progress,
    )
    print(format_table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    progress(f"wrote {args.json} in {result['seconds']}s")
    return 0


def _has_river() -> bool:
    try:
        import river  # noqa: F401
    except ImportError:
        print("bench: river is not installed: no baselines (pip install river)", file=sys.stderr)
        return False
    return True
