"""``winnow bench drift``: the drift detectors against River baselines, Alibi Detect's protocol.

A small CNN is fine-tuned on 70 % of the dataset's training split; its
outputs on the other 30 % make the drift reference (as a release's holdout
would), and its outputs on the test split make the streams. Features are
computed once per shift; each run is a stream resampled from them, so
hundreds of runs are cheap. As in Alibi Detect's online examples:

- ``mean_run_length``: mean frames to the first alarm over ``runs`` streams of
  undrifted frames (compare with ``ert``; runs are cut at ``6 ert`` and then
  count as that long);
- per shift, ``runs`` streams of ``change_at`` undrifted frames followed by
  drifted ones; a detector resets after an alarm and the first alarm at or
  after the change gives the delay (frames of drifted data seen);
  ``detected_fraction`` is the share of runs with an alarm within ``ert``
  frames of the change, ``mean_delay`` and ``median_delay`` are over those.

Baselines on the max-probability stream, calibrated by simulation on the
reference to the same ERT: River's ADWIN (its ``delta``) and Page-Hinkley
(its ``threshold``). Alibi Detect itself does not install next to numpy 2
(0.13 pins numpy<2, Pillow<11, numba<0.60), so it is not run.
"""

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from schemas.drift import DriftReference
from service.drift import Rows, build_detectors, calibrate
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
        # more alarms with a larger ADWIN delta, fewer with a larger PH threshold
        lo, hi = (
            (np.log(1e-12), np.log(0.9)) if self.name == "adwin" else (np.log(0.01), np.log(50))
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
    progress: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Runs the benchmark; returns the JSON-ready result."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    data = load_dataset(dataset)
    progress(f"fine-tuning small-cnn on {data.name}")
    model, spec, ref_images, _ = _train_model(data, seed)
    reference = DriftReference.build(*_outputs(model, spec, ref_images), seed=seed)
    test = data.test_images[:3000]
    features: dict[str, Features] = {}

    def featurize(name: str, images: np.ndarray) -> None:
        embeddings, probabilities = _outputs(model, spec, images)
        rows = Rows.from_outputs(reference, embeddings, probabilities)
        features[name] = Features(rows, probabilities.max(axis=1))

    progress("computing features of each shift")
    featurize("none", test)
    for name in shifts:
        if name == "class_mix":
            continue
        images = (
            _other_camera(data, len(test), rng)
            if name == "new_camera"
            else shift_images(name, test, rng)
        )
        featurize(name, images)
    detectors = build_detectors(
        reference, embedding_window=embedding_window, class_window=class_window
    )
    pool = Rows.reference_pool(reference)
    for i, detector in enumerate(detectors):
        t = time.perf_counter()
        calibrate(detector, pool, ert, seed + i, reference_frames=reference.frames)
        progress(
            f"calibrated {detector.name}: threshold {detector.threshold:.4g} "
            f"in {time.perf_counter() - t:.1f}s"
        )
    rivals: list[_RiverBaseline] = []
    if baselines:
        ref_conf = np.asarray(_ref_confidence(model, spec, ref_images))
        for name in ("adwin", "page_hinkley"):
            baseline = _RiverBaseline(name)
            t = time.perf_counter()
            baseline.calibrate(ref_conf, ert, rng, runs=max(30, runs // 3))
            progress(
                f"calibrated {name}: parameter {baseline.param:.4g} "
                f"in {time.perf_counter() - t:.1f}s"
            )
            rivals.append(baseline)
    change_at = max(embedding_window, class_window)
    cap, horizon = 6 * ert, ert
    clean = features["none"]
    results: dict[str, Any] = {}
    for detector in detectors:
        index = rng.integers(len(clean.rows), size=(runs, cap))
        runs_h0 = detector.trajectories(clean.rows, index)
        first = (np.maximum.accumulate(runs_h0, axis=1) <= detector.threshold).sum(axis=1) + 1
        results[detector.name] = {
            "kind": "winnow",
            "ert": ert,
            "window": detector.window,
            "threshold": detector.threshold,
            "mean_run_length": float(np.minimum(first, cap).mean()),
            "censored_runs": int((first > cap).sum()),
            "shifts": {},
        }
    for baseline in rivals:
        streams = clean.confidence[rng.integers(len(clean.confidence), size=(runs, cap))]
        first = baseline.first_alarms(streams) + 1
        results[baseline.name] = {
            "kind": "baseline (river, max probability)",
            "ert": ert,
            "parameter": baseline.param,
            "mean_run_length": float(np.minimum(first, cap).mean()),
            "censored_runs": int((first > cap).sum()),
            "shifts": {},
        }
        progress(f"{baseline.name}: no-drift runs done")
    for shift in shifts:
        index = _shift_index(shift, features, data, rng, runs, change_at, horizon)
        rows, conf = _concat(features, shift)
        for detector in detectors:
            first = _our_first_alarms(detector, rows, index, change_at)
            results[detector.name]["shifts"][shift] = _summary(first, change_at, horizon)
        for baseline in rivals:
            first = baseline.first_alarms(conf[index], change_at)
            results[baseline.name]["shifts"][shift] = _summary(first, change_at, horizon)
        progress(f"shift {shift} done")
    return {
        "dataset": data.name,
        "ert": ert,
        "runs": runs,
        "change_at": change_at,
        "horizon": horizon,
        "embedding_window": embedding_window,
        "class_window": class_window,
        "reference_frames": reference.frames,
        "alibi_detect": "not run: alibi-detect 0.13 requires numpy<2 (this project has numpy 2)",
        "seconds": round(time.perf_counter() - started, 1),
        "detectors": results,
    }


def _ref_confidence(model: Any, spec: Any, images: np.ndarray) -> np.ndarray:
    _, probabilities = _outputs(model, spec, images)
    return probabilities.max(axis=1)


def _concat(features: dict[str, Features], shift: str) -> tuple[Rows, np.ndarray]:
    """The clean features followed by the shifted ones (class_mix reuses the clean ones)."""
    clean = features["none"]
    other = features.get(shift, clean)
    rows = Rows(
        np.concatenate([clean.rows.reduced, other.rows.reduced]),
        np.concatenate([clean.rows.classes, other.rows.classes]),
        np.concatenate([clean.rows.entropy, other.rows.entropy]),
    )
    return rows, np.concatenate([clean.confidence, other.confidence])


def _shift_index(
    shift: str,
    features: dict[str, Features],
    data: ImageDataset,
    rng: np.random.Generator,
    runs: int,
    change_at: int,
    horizon: int,
) -> np.ndarray:
    """Rows of ``_concat``: ``change_at`` clean frames, then ``horizon`` drifted ones."""
    n = len(features["none"].rows)
    before = rng.integers(n, size=(runs, change_at))
    if shift == "class_mix":
        # half the classes disappear from the stream
        labels = data.test_labels[:n]
        kept = np.flatnonzero(labels < max(1, len(data.classes) // 2))
        after = n + kept[rng.integers(len(kept), size=(runs, horizon))]
    else:
        after = n + rng.integers(len(features[shift].rows), size=(runs, horizon))
    return np.concatenate([before, after], axis=1)


def format_table(result: dict[str, Any]) -> str:
    shifts = list(next(iter(result["detectors"].values()))["shifts"])
    head = f"{'detector':<14} {'ERT':>6} {'run len':>8} " + " ".join(
        f"{s[:11]:>17}" for s in shifts
    )
    lines = [
        f"drift bench on {result['dataset']}: {result['runs']} runs per case, change after "
        f"{result['change_at']} frames; per shift: mean/median delay (detected %)",
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
        lines.append(
            f"{name:<14} {r['ert']:>6} {r['mean_run_length']:>8.0f} "
            + " ".join(f"{c:>17}" for c in cells)
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
