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
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from schemas.drift import DriftReference
from service.drift import Rows, Simulation, build_detectors
from service.drift.detectors import Detector
from winnow.datasets import ImageDataset, load_dataset

log = logging.getLogger(__name__)

SHIFTS = ("brightness", "contrast", "blur", "noise", "rotation", "class_mix", "new_camera")
OTHER_DATASET = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "pneumoniamnist.npz"
)


@dataclass
class Features:
    rows: Rows
    confidence: np.ndarray  # max probability per frame


# -- the model and its outputs ----------------------------------------------------------------


def _train_model(data: ImageDataset, seed: int) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """A small CNN fine-tuned on 70 % of the train split; returns it, its spec, and the
    remaining 30 % (images, labels) for the reference."""
    import torch

    from schemas.model_spec import ModelSpec
    from trainer.architectures import build_model
    from trainer.finetune import FinetuneConfig, finetune_round
    from trainer.model_init import default_normalization, seed_everything
    from trainer.samples import Sample

    seed_everything(seed)
    size = 16 if data.name == "digits" else 28
    model = build_model("small-cnn", len(data.classes), data.channels)
    mean, std = default_normalization(data.channels)
    spec = ModelSpec(
        version="bench",
        arch="small-cnn",
        classes=data.classes,
        input_size=(size, size),
        channels=data.channels,  # type: ignore[arg-type]
        mean=list(mean),
        std=list(std),
        embedding_dim=model.embedding_dim,
    )
    order = np.random.default_rng(seed).permutation(len(data.train_images))
    cut = int(0.7 * len(order))
    fit = order[:cut][:4000]
    inputs = _inputs(data.train_images[fit], spec)
    samples = [
        Sample(str(i), x, int(y))
        for i, x, y in zip(fit, inputs, data.train_labels[fit], strict=True)
    ]
    config = FinetuneConfig.for_arch("small-cnn", epochs=8, max_steps=400, seed=seed)
    finetune_round(model, samples, [], config, torch.device("cpu"))
    rest = order[cut:][:3000]
    return model, spec, data.train_images[rest], data.train_labels[rest]


def _inputs(images: np.ndarray, spec: Any) -> np.ndarray:
    from schemas.pixels import image_to_input

    return np.stack([image_to_input(Image.fromarray(im), spec) for im in images])


def _outputs(model: Any, spec: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from trainer.reference import model_outputs

    probabilities, embeddings = model_outputs(model, _inputs(images, spec), torch.device("cpu"))
    return embeddings, probabilities


# -- shifts -----------------------------------------------------------------------------------


def shift_images(name: str, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The test images under one covariate shift (uint8 in, uint8 out)."""
    x = images.astype(np.float32)
    if name == "brightness":
        return np.clip(x + 70, 0, 255).astype(np.uint8)
    if name == "contrast":
        mean = x.mean(axis=tuple(range(1, x.ndim)), keepdims=True)
        return np.clip((x - mean) * 0.5 + mean, 0, 255).astype(np.uint8)
    if name == "noise":
        return np.clip(x + rng.normal(0, 40, x.shape), 0, 255).astype(np.uint8)
    if name == "blur":
        radius = 0.8 if images.shape[1] <= 16 else 1.5
        return np.stack(
            [
                np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius)))
                for im in images
            ]
        )
    if name == "rotation":
        return np.stack([np.asarray(Image.fromarray(im).rotate(30)) for im in images])
    raise ValueError(f"unknown image shift {name!r}")


def _other_camera(data: ImageDataset, count: int, rng: np.random.Generator) -> np.ndarray:
    """Frames of another dataset, as a new camera would send: pneumonia X-rays for
    digits (if present), else crops of scikit-learn's sample photos."""
    shape = data.test_images.shape[1:]
    if data.name == "digits" and OTHER_DATASET.exists():
        with np.load(OTHER_DATASET) as other:
            images = other["test_images"][:count]
    else:
        from sklearn.datasets import load_sample_images

        photos = load_sample_images().images
        images = []
        for _ in range(count):
            photo = photos[int(rng.integers(len(photos)))]
            y, x = rng.integers(0, photo.shape[0] - 100), rng.integers(0, photo.shape[1] - 100)
            images.append(photo[y : y + 100, x : x + 100])
        images = np.stack(images)
    mode = "L" if len(shape) == 2 else "RGB"
    return np.stack(
        [np.asarray(Image.fromarray(im).convert(mode).resize(shape[:2][::-1])) for im in images]
    )


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
class _HeldOut:
    """The model's outputs on the frames it was not trained on, undrifted and shifted."""

    embeddings: dict[str, np.ndarray]  # "none" (undrifted) or a shift name -> N x D
    probabilities: dict[str, np.ndarray]
    labels: np.ndarray  # of the undrifted frames

    def rows(self, reference: DriftReference, name: str, index: np.ndarray) -> Features:
        probabilities = self.probabilities[name][index]
        rows = Rows.from_outputs(reference, self.embeddings[name][index], probabilities)
        return Features(rows, probabilities.max(axis=1))


@dataclass
class _Tally:
    """First alarms of one detector (or baseline) over all reference draws."""

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
    progress(f"fine-tuning small-cnn on {data.name}")
    model, spec, rest_images, rest_labels = _train_model(data, seed)
    images = np.concatenate([rest_images, data.test_images[:3000]])
    labels = np.concatenate([rest_labels, data.test_labels[:3000]])
    progress(f"computing features of {len(images)} held-out frames under each shift")
    held = _held_out(model, spec, data, images, labels, shifts, rng)
    n = len(labels)
    n_ref = min(reference_frames, n // 2)
    # Undrifted streams are resampled from the frames left after the reference: that
    # finite pool is off the true distribution by its own sampling error, as the reference
    # is, so calibration is told the error of both together (1/n = 1/reference + 1/pool).
    n_cal = max(2, round(1 / (1 / n_ref + 1 / (n - n_ref))))
    per_draw = max(1, -(-runs // references))
    change_at = max(embedding_window, class_window)
    cap, horizon = 20 * ert, ert
    rivals = _calibrated_baselines(held, ert, rng, runs, progress) if baselines else []
    tallies: dict[str, _Tally] = {}
    windows: dict[str, int] = {}
    for draw in range(references):
        order = rng.permutation(n)
        ref_rows, pool_rows = order[:n_ref], order[n_ref:]
        reference = DriftReference.build(
            held.embeddings["none"][ref_rows],
            held.probabilities["none"][ref_rows],
            seed=seed + draw,
        )
        single = build_detectors(
            reference, embedding_window=embedding_window, class_window=class_window
        )
        sample = Rows.reference_pool(reference)
        simulation = Simulation(single, sample, ert, seed + draw, reference_frames=n_cal)
        simulation.apply(simulation.thresholds(ert))
        joint = [d.fresh() for d in single]
        for detector, threshold in zip(joint, simulation.together(ert), strict=True):
            detector.threshold = threshold
        windows.update((d.name, d.window) for d in single)
        clean = held.rows(reference, "none", pool_rows)
        index = rng.integers(len(pool_rows), size=(per_draw, cap))
        first = {d.name: _undrifted_first_alarms(d, clean.rows, index) for d in single}
        first["combined"] = np.min(
            [_undrifted_first_alarms(d, clean.rows, index) for d in joint], 0
        )
        for baseline in rivals:
            first[baseline.name] = baseline.first_alarms(clean.confidence[index])
        for name, value in first.items():
            tallies.setdefault(name, _Tally()).first.append(value + 1)
        for shift in shifts:
            stream, index = _shift_stream(
                shift, held, reference, clean, pool_rows, rng, per_draw, change_at, horizon
            )
            first = {d.name: _our_first_alarms(d, stream.rows, index, change_at) for d in single}
            first["combined"] = np.min(
                [_our_first_alarms(d, stream.rows, index, change_at) for d in joint], 0
            )
            for baseline in rivals:
                first[baseline.name] = baseline.first_alarms(stream.confidence[index], change_at)
            for name, value in first.items():
                tallies[name].shifts.setdefault(shift, []).append(value)
        progress(
            f"reference draw {draw + 1}/{references}: thresholds "
            + ", ".join(f"{d.name} {d.threshold:.4g}" for d in single)
        )
    results: dict[str, Any] = {}
    for name, tally in tallies.items():
        per_reference = [float(np.minimum(f, cap).mean()) for f in tally.first]
        everything = np.concatenate(tally.first)
        baseline = next((b for b in rivals if b.name == name), None)
        results[name] = {
            "kind": _kind(name, baseline),
            "ert": ert,
            "window": windows.get(name),
            "parameter": baseline.param if baseline else None,
            "mean_run_length": float(np.minimum(everything, cap).mean()),
            "censored_runs": int((everything > cap).sum()),
            "run_length_by_reference": {
                "p10": float(np.quantile(per_reference, 0.1)),
                "median": float(np.median(per_reference)),
                "p90": float(np.quantile(per_reference, 0.9)),
            },
            "shifts": {
                shift: _summary(np.concatenate(firsts), change_at, horizon)
                for shift, firsts in tally.shifts.items()
            },
        }
    return {
        "dataset": data.name,
        "ert": ert,
        "runs": per_draw * references,
        "references": references,
        "change_at": change_at,
        "horizon": horizon,
        "embedding_window": embedding_window,
        "class_window": class_window,
        "reference_frames": n_ref,
        "stream_pool_frames": n - n_ref,
        "calibration_reference_frames": n_cal,
        "alibi_detect": "not run: alibi-detect 0.13 requires numpy<2 (this project has numpy 2)",
        "seconds": round(time.perf_counter() - started, 1),
        "detectors": results,
    }


def _kind(name: str, baseline: "_RiverBaseline | None") -> str:
    if baseline is not None:
        return "baseline (river, max probability)"
    if name == "combined":
        return "winnow: an alarm from any detector, each calibrated to (detectors x ERT)"
    return "winnow"


def _held_out(
    model: Any,
    spec: Any,
    data: ImageDataset,
    images: np.ndarray,
    labels: np.ndarray,
    shifts: tuple[str, ...],
    rng: np.random.Generator,
) -> _HeldOut:
    embeddings, probabilities = {}, {}
    for name in ("none", *shifts):
        if name == "class_mix":
            continue
        if name == "none":
            shifted = images
        elif name == "new_camera":
            shifted = _other_camera(data, len(images), rng)
        else:
            shifted = shift_images(name, images, rng)
        embeddings[name], probabilities[name] = _outputs(model, spec, shifted)
    return _HeldOut(embeddings, probabilities, labels)


def _calibrated_baselines(
    held: _HeldOut,
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


def _shift_stream(
    shift: str,
    held: _HeldOut,
    reference: DriftReference,
    clean: Features,
    pool_rows: np.ndarray,
    rng: np.random.Generator,
    runs: int,
    change_at: int,
    horizon: int,
) -> tuple[Features, np.ndarray]:
    """Undrifted pool frames followed by drifted ones, and run indexes into them:
    ``change_at`` undrifted frames, then ``horizon`` drifted ones."""
    if shift == "class_mix":  # half the classes disappear from the stream
        classes = int(held.labels.max()) + 1
        kept = pool_rows[held.labels[pool_rows] < max(1, classes // 2)]
        drifted = held.rows(reference, "none", kept)
    elif shift == "new_camera":
        drifted = held.rows(reference, shift, np.arange(len(held.embeddings[shift])))
    else:  # the same frames as the undrifted pool, shifted
        drifted = held.rows(reference, shift, pool_rows)
    rows = Rows(
        np.concatenate([clean.rows.reduced, drifted.rows.reduced]),
        np.concatenate([clean.rows.classes, drifted.rows.classes]),
        np.concatenate([clean.rows.entropy, drifted.rows.entropy]),
    )
    stream = Features(rows, np.concatenate([clean.confidence, drifted.confidence]))
    before = rng.integers(len(clean.rows), size=(runs, change_at))
    after = len(clean.rows) + rng.integers(len(drifted.rows), size=(runs, horizon))
    return stream, np.concatenate([before, after], axis=1)


def format_table(result: dict[str, Any]) -> str:
    shifts = list(next(iter(result["detectors"].values()))["shifts"])
    head = f"{'detector':<14} {'ERT':>6} {'run len':>8} {'p10-p90':>11} " + " ".join(
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
        spread = r["run_length_by_reference"]
        lines.append(
            f"{name:<14} {r['ert']:>6} {r['mean_run_length']:>8.0f} "
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
