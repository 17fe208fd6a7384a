"""``winnow bench label-efficiency``: labels each query strategy needs, against random sampling.

The training split is streamed in a seeded random order (several passes if
the budget runs out of stream; a frame once labeled is not asked again) in
batches of ``--batch`` frames, as the scorer sees them. Every strategy starts
from the same initial weights per seed and is trained the same way: an
oracle answers each selected frame, and every ``--round-labels`` labels
``trainer.finetune.finetune_round`` fine-tunes the model on the new labels plus
a replay of the earlier ones, exactly as the trainer does; the test accuracy is
then recorded. Until the first round the model has learned nothing and every
strategy samples at random (the policy's cold start).

Winnow's strategies go through ``service.selection.policy.QueryPolicy`` (utilities,
filters, windowed selection, the exact budget); scikit-activeml's stream
strategies (``skal-*``) are fed the same CNN's probabilities (and, for
``StreamProbabilisticAL``, its embeddings) at the same budget, as peers.

Reported per strategy: the mean and std over seeds of the accuracy after each
multiple of ``--round-labels``; ``labels_to_target``, the first label count
where the mean accuracy reaches ``target = 0.95 × full_accuracy`` (training on
every training label); ``savings_vs_random``, random's labels-to-target over the
strategy's (null where either never reaches it within ``--max-labels``).

``--video`` turns each image into a burst of consecutive near-copies (shifts of
a pixel and sensor noise), as endoscope video looks.
"""

import argparse
import json
import logging
import math
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StrategySpec:
    """A strategy of the benchmark: a Winnow policy configuration or a scikit-activeml peer."""

    policy: str = "variable"
    utility: str = "entropy"
    filters: tuple[str, ...] = ()
    selector: str = "none"
    peer: str | None = None  # scikit-activeml class name


STRATEGIES: dict[str, StrategySpec] = {
    "random": StrategySpec(policy="random"),
    "entropy": StrategySpec(utility="entropy"),
    "margin": StrategySpec(utility="margin"),
    "aift": StrategySpec(utility="aift"),
    "aift-entropy": StrategySpec(utility="aift_entropy"),
    "aift+filters": StrategySpec(utility="aift", filters=("dedup", "density", "balance")),
    "margin+filters": StrategySpec(utility="margin", filters=("dedup", "density", "balance")),
    "margin+dedup": StrategySpec(utility="margin", filters=("dedup",)),
    "aift+dedup": StrategySpec(utility="aift", filters=("dedup",)),
    "bald": StrategySpec(utility="bald"),
    "coreset": StrategySpec(utility="entropy", selector="coreset"),
    "badge": StrategySpec(utility="entropy", selector="badge"),
    "skal-variable-uncertainty": StrategySpec(peer="VariableUncertainty"),
    "skal-split": StrategySpec(peer="Split"),
    "skal-pal": StrategySpec(peer="StreamProbabilisticAL"),
}
DEFAULT_STRATEGIES = (
    "random",
    "entropy",
    "margin",
    "aift",
    "aift+filters",
    "bald",
    "badge",
    "skal-variable-uncertainty",
    "skal-split",
    "skal-pal",
)
VIDEO_DEFAULT_STRATEGIES = (
    "random",
    "margin",
    "margin+dedup",
    "aift",
    "aift+dedup",
    "skal-variable-uncertainty",
    "skal-split",
)
STRATEGY_KEYS = ("labels", "accuracy_mean", "accuracy_std", "labels_to_target", "savings_vs_random")


@dataclass(frozen=True)
class BenchConfig:
    dataset: str = "digits"
    seeds: tuple[int, ...] = (0, 1, 2)
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    budget: float = 0.1
    window: int = 200
    batch: int = 32
    round_labels: int = 10
    max_labels: int = 200
    max_passes: int = 6
    video: bool = False
    burst: int = 5
    aift_views: int = 8
    mc_passes: int = 16
    min_steps: int = 100
    full_steps: int | None = None
    workers: int = 2
    target_ratio: float = 0.95


@dataclass
class _Data:
    """The preprocessed stream (training frames) and the test split."""

    inputs: np.ndarray
    labels: np.ndarray
    bursts: np.ndarray  # burst id of each frame: a pass permutes bursts, keeping each in order
    test_inputs: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    arch: str
    channels: int
    extras: dict[str, Any] = field(default_factory=dict)


def _spec(name: str, classes: list[str], channels: int, size: int) -> Any:
    from schemas.model_spec import ModelSpec
    from trainer.model_init import default_normalization

    mean, std = default_normalization(channels)
    return ModelSpec(
        version="bench",
        arch="small-cnn",
        classes=classes,
        input_size=(size, size),
        channels=channels,  # type: ignore[arg-type]
        mean=mean,
        std=std,
        embedding_dim=128,
    )


def _video(images: np.ndarray, burst: int, rng: np.random.Generator) -> np.ndarray:
    """Each image as ``burst`` near-copies: shifts of up to a pixel and Gaussian noise (σ=4)."""
    out = []
    for image in images:
        for _ in range(burst):
            dy, dx = rng.integers(-1, 2, size=2)
            shifted = np.roll(image, (int(dy), int(dx)), axis=(0, 1))
            noisy = shifted.astype(np.float32) + rng.normal(0, 4, size=shifted.shape)
            out.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return np.stack(out)


def prepare(config: BenchConfig) -> tuple[_Data, Any, Any]:
    """Loads the dataset and preprocesses it as the scorer does."""
    from PIL import Image

    from schemas.pixels import image_to_input
    from winnow.datasets import load_dataset

    data = load_dataset(config.dataset)
    size = 16 if data.name == "digits" else 28
    spec = _spec(data.name, data.classes, data.channels, size)
    train_images, train_labels = data.train_images, data.train_labels
    bursts = np.arange(len(train_images))
    if config.video:
        train_images = _video(train_images, config.burst, np.random.default_rng(1234))
        train_labels = np.repeat(train_labels, config.burst)
        bursts = np.repeat(bursts, config.burst)

    def pre(images: np.ndarray) -> np.ndarray:
        return np.stack([image_to_input(Image.fromarray(i), spec) for i in images])

    prepared = _Data(
        pre(train_images),
        train_labels.astype(np.int64),
        bursts,
        pre(data.test_images),
        data.test_labels.astype(np.int64),
        list(data.classes),
        "small-cnn",
        data.channels,
    )
    return prepared, spec, data


# -- one run: a strategy, a seed --------------------------------------------------------------

_DATA: _Data | None = None


def _init_worker(data: _Data) -> None:
    import torch

    global _DATA
    _DATA = data
    torch.set_num_threads(1)


def _forward(model: Any, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    probs, embs = [], []
    with torch.inference_mode():
        for start in range(0, len(inputs), 512):
            p, e = model(torch.from_numpy(np.ascontiguousarray(inputs[start : start + 512])))
            probs.append(p.numpy())
            embs.append(e.numpy())
    return np.concatenate(probs), np.concatenate(embs)


class _Precomputed:
    """A scikit-activeml classifier whose features end with the CNN's probabilities."""

    @staticmethod
    def build(n_classes: int) -> Any:
        from skactiveml.base import SkactivemlClassifier

        class Precomputed(SkactivemlClassifier):
            def __init__(self, classes: Any = None, missing_label: Any = np.nan, n: int = 2):
                super().__init__(classes=classes, missing_label=missing_label)
                self.n = n

            def fit(self, X: Any, y: Any, sample_weight: Any = None) -> "Precomputed":
                return self

            def predict_proba(self, X: Any) -> np.ndarray:
                return np.asarray(X)[:, -self.n :]

            def predict_freq(self, X: Any) -> np.ndarray:
                return self.predict_proba(X)

        return Precomputed(classes=np.arange(n_classes), n=n_classes)


def _peer(name: str, budget: float, seed: int) -> Any:
    from skactiveml import stream

    cls = getattr(stream, name)
    if name == "StreamProbabilisticAL":
        return cls(budget=budget, random_state=seed, metric="rbf")
    return cls(budget=budget, random_state=seed)


def run_one(args: tuple[str, int, BenchConfig]) -> tuple[str, int, list[int], list[float], float]:
    """Streams once for one strategy and seed; returns the label counts and test accuracies."""
    import torch

    from service.scoring.aift import AIFT_UTILITIES, ViewMaker, ViewSpec, aift_utilities
    from service.scoring.committee import (
        COMMITTEE_UTILITIES,
        committee_utilities,
        mc_dropout_probabilities,
    )
    from service.scoring.uncertainty import score_batch
    from service.selection.filters import DecisionContext
    from service.selection.policy import QueryPolicy
    from trainer.architectures import build_model
    from trainer.finetune import FinetuneConfig, finetune_round
    from trainer.model_init import seed_everything
    from trainer.samples import Sample

    name, seed, config = args
    data = _DATA
    assert data is not None
    started = time.perf_counter()
    spec = STRATEGIES[name]
    n_classes = len(data.classes)
    seed_everything(seed)
    model = build_model(data.arch, n_classes, data.channels)  # the same init for every strategy
    model.eval()
    device = torch.device("cpu")
    finetune = FinetuneConfig.for_arch(data.arch, seed=seed, min_steps=config.min_steps)
    policy = QueryPolicy(
        name="random" if spec.peer else spec.policy,  # type: ignore[arg-type]
        utility="entropy" if spec.peer else spec.utility,  # type: ignore[arg-type]
        budget=config.budget,
        window=config.window,
        seed=seed,
        filters=spec.filters,  # type: ignore[arg-type]
        selector=spec.selector,  # type: ignore[arg-type]
    )
    policy.on_model(labels_trained=0)  # cold start: random until the first round
    views = ViewMaker(ViewSpec(count=config.aift_views, seed=seed))
    peer = _peer(spec.peer, config.budget, seed) if spec.peer else None
    peer_clf = _Precomputed.build(n_classes) if spec.peer else None
    rng = np.random.default_rng(seed)
    mc_rng = np.random.default_rng(seed + 1000)
    labeled: list[Sample] = []
    new: list[Sample] = []
    asked: set[int] = set()
    labels_curve: list[int] = []
    acc_curve: list[float] = []
    burst_ids = np.unique(data.bursts)
    frames_of = {b: np.flatnonzero(data.bursts == b) for b in burst_ids} if config.video else None
    head = None

    def train_round() -> None:
        nonlocal head
        batch, rest = new[: config.round_labels], new[config.round_labels :]
        finetune_round(model, batch, labeled, finetune, device)
        labeled.extend(batch)
        new[:] = rest
        model.eval()
        head = (
            model.head.weight.detach().numpy().astype(np.float64),
            model.head.bias.detach().numpy().astype(np.float64),
            float(model.dropout.p),
        )
        policy.on_model(labels_trained=len(labeled))
        probs, _ = _forward(model, data.test_inputs)
        labels_curve.append(len(labeled))
        acc_curve.append(float((probs.argmax(axis=1) == data.test_labels).mean()))

    for _ in range(config.max_passes):
        order_bursts = rng.permutation(burst_ids)
        order = np.concatenate([frames_of[b] for b in order_bursts]) if frames_of else order_bursts
        order = np.array([i for i in order if int(i) not in asked])
        for start in range(0, len(order), config.batch):
            if len(labeled) >= config.max_labels:
                break
            chunk = order[start : start + config.batch]
            x = data.inputs[chunk]
            probs, emb = _forward(model, x)
            if policy.cold_start or peer is None:
                needs = policy.needs  # none during cold start
                scores = score_batch(probs)
                if needs & set(AIFT_UTILITIES):
                    view_probs, _ = _forward(model, views(x))
                    scores.update(aift_utilities(view_probs.reshape(len(x), views.count, -1)))
                if needs & set(COMMITTEE_UTILITIES) and head is not None:
                    samples = mc_dropout_probabilities(
                        emb.astype(np.float64), head[0], head[1], head[2], config.mc_passes, mc_rng
                    )
                    scores.update(committee_utilities(samples))
                context = DecisionContext(emb, probs, ["stream"] * len(x))
                picked = [i for i, d in enumerate(policy.decide(scores, context)) if d["selected"]]
            else:
                picked = _peer_query(peer, peer_clf, spec.peer, probs, emb, labeled, model)
            for i in picked:
                index = int(chunk[i])
                asked.add(index)
                new.append(Sample(str(index), data.inputs[index], int(data.labels[index])))
                if len(new) >= config.round_labels:
                    train_round()
        if len(labeled) >= config.max_labels:
            break
    return name, seed, labels_curve, acc_curve, time.perf_counter() - started


def _peer_query(
    peer: Any,
    clf: Any,
    kind: str | None,
    probs: np.ndarray,
    emb: np.ndarray,
    labeled: list[Any],
    model: Any,
) -> list[int]:
    """One batch through a scikit-activeml stream strategy, frame by frame as it is meant."""
    if kind == "StreamProbabilisticAL":
        unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        candidates = np.hstack([unit, probs])
        from trainer.samples import stack

        x_lab, y_lab = stack(labeled)
        p_lab, e_lab = _forward(model, x_lab)
        e_lab = e_lab / np.maximum(np.linalg.norm(e_lab, axis=1, keepdims=True), 1e-12)
        X = np.hstack([e_lab, p_lab])
        y = y_lab.astype(float)
        picked = []
        for i in range(len(candidates)):
            c = candidates[i : i + 1]
            idx, utilities = peer.query(
                c, clf, X=X, y=y, utility_weight=np.ones(1), return_utilities=True
            )
            peer.update(c, idx, budget_manager_param_dict={"utilities": utilities})
            if len(idx):
                picked.append(i)
        return picked
    picked = []
    for i in range(len(probs)):
        c = probs[i : i + 1]
        idx = peer.query(c, clf)
        peer.update(c, idx)
        if len(idx):
            picked.append(i)
    return picked


# -- the whole benchmark ----------------------------------------------------------------------


def _labels_to_target(labels: list[int], accuracy: list[float], target: float) -> int | None:
    for count, value in zip(labels, accuracy, strict=True):
        if value >= target:
            return count
    return None


def summarize(
    runs: dict[str, list[tuple[list[int], list[float]]]], full: float, target: float
) -> dict[str, dict[str, Any]]:
    """Mean and std curves over seeds, labels-to-target and savings against random."""
    out: dict[str, dict[str, Any]] = {}
    for name, seeds in runs.items():
        length = min(len(labels) for labels, _ in seeds)
        labels = seeds[0][0][:length]
        acc = np.array([a[:length] for _, a in seeds])
        mean = acc.mean(axis=0).tolist() if length else []
        out[name] = {
            "labels": labels,
            "accuracy_mean": [round(v, 4) for v in mean],
            "accuracy_std": [round(v, 4) for v in (acc.std(axis=0).tolist() if length else [])],
            "labels_to_target": _labels_to_target(labels, mean, target),
            "savings_vs_random": None,
            "peer": STRATEGIES[name].peer is not None,
            "settings": asdict(STRATEGIES[name]),
        }
    random_ltt = out.get("random", {}).get("labels_to_target")
    for entry in out.values():
        ltt = entry["labels_to_target"]
        if random_ltt is not None and ltt:
            entry["savings_vs_random"] = round(random_ltt / ltt, 3)
    return out


def full_accuracy(data: _Data, config: BenchConfig, seed: int = 0) -> float:
    """The same model and procedure trained on every training label (one long round)."""
    import torch

    from trainer.architectures import build_model
    from trainer.finetune import FinetuneConfig, finetune_round
    from trainer.model_init import seed_everything
    from trainer.samples import Sample

    torch.set_num_threads(1)
    seed_everything(seed)
    model = build_model(data.arch, len(data.classes), data.channels)
    unique = np.unique(data.bursts, return_index=True)[1]  # one frame per image in video mode
    train = [Sample(str(i), data.inputs[i], int(data.labels[i])) for i in unique]
    steps = config.full_steps or max(600, 10 * len(train) // 32)
    finetune = FinetuneConfig.for_arch(
        data.arch, epochs=10, max_steps=steps, min_steps=steps, replay_min=0, seed=seed
    )
    finetune_round(model, train, [], finetune, torch.device("cpu"))
    probs, _ = _forward(model, data.test_inputs)
    return float((probs.argmax(axis=1) == data.test_labels).mean())


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Runs every strategy for every seed (in ``workers`` processes) and summarizes."""
    started = time.perf_counter()
    data, _, _ = prepare(config)
    jobs = [(name, seed, config) for seed in config.seeds for name in config.strategies]
    results: dict[str, list[tuple[list[int], list[float]]]] = {n: [] for n in config.strategies}
    seconds: dict[str, float] = {n: 0.0 for n in config.strategies}
    context = multiprocessing.get_context("spawn")
    with context.Pool(config.workers, initializer=_init_worker, initargs=(data,)) as pool:
        full_job = pool.apply_async(full_accuracy, (data, config))
        for name, seed, labels, acc, spent in pool.imap_unordered(run_one, jobs):
            results[name].append((labels, acc))
            seconds[name] += spent
            log.info(
                "done strategy=%s seed=%d final=%.3f in %.0fs",
                name,
                seed,
                acc[-1] if acc else math.nan,
                spent,
            )
        full = full_job.get()
    target = config.target_ratio * full
    strategies = summarize(results, full, target)
    for name, entry in strategies.items():
        entry["seconds"] = round(seconds[name], 1)
    return {
        "dataset": config.dataset,
        "video": config.video,
        "config": {k: v for k, v in asdict(config).items() if k != "strategies"},
        "full_accuracy": round(full, 4),
        "target": round(target, 4),
        "strategies": strategies,
        "seconds": round(time.perf_counter() - started, 1),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy against labels, mean ± std bands; full accuracy and target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, entry in result["strategies"].items():
        x = np.array(entry["labels"])
        mean, std = np.array(entry["accuracy_mean"]), np.array(entry["accuracy_std"])
        style = ":" if entry["peer"] else ("--" if name == "random" else "-")
        (line,) = ax.plot(x, mean, style, label=name)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.axhline(result["full_accuracy"], color="grey", linestyle="--", label="all labels")
    ax.axhline(result["target"], color="grey", linestyle=":", label="95% of all labels")
    ax.set_xlabel("labels")
    ax.set_ylabel("test accuracy")
    kind = " (video bursts)" if result["video"] else ""
    ax.set_title(f"label efficiency on {Path(result['dataset']).stem}{kind}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    lines = [
        f"dataset={result['dataset']} video={result['video']} "
        f"full_accuracy={result['full_accuracy']:.4f} target={result['target']:.4f}",
        f"{'strategy':<28}{'final acc':>14}{'labels→target':>15}{'savings':>9}",
    ]
    for name, entry in result["strategies"].items():
        final = (
            f"{entry['accuracy_mean'][-1]:.3f}±{entry['accuracy_std'][-1]:.3f}"
            if entry["accuracy_mean"]
            else "-"
        )
        ltt = entry["labels_to_target"]
        sav = entry["savings_vs_random"]
        lines.append(
            f"{name:<28}{final:>14}{(str(ltt) if ltt else '>max'):>15}"
            f"{(f'{sav:.2f}x' if sav else '-'):>9}"
        )
    return "\n".join(lines)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    names = args.strategies.split(",") if args.strategies else None
    default = VIDEO_DEFAULT_STRATEGIES if args.video else DEFAULT_STRATEGIES
    strategies = tuple(names or default)
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; known: {', '.join(STRATEGIES)}")
    if "random" not in strategies:
        strategies = ("random", *strategies)
    return BenchConfig(
        dataset=args.dataset,
        seeds=tuple(range(args.seeds)),
        strategies=strategies,
        budget=args.budget,
        round_labels=args.round_labels,
        max_labels=args.max_labels,
        video=args.video,
        workers=args.workers,
        min_steps=args.min_steps,
        full_steps=args.full_steps,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", help="digits, or a MedMNIST-layout .npz")
    p.add_argument("--json", type=Path, default=Path("label-efficiency.json"))
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--video", action="store_true", help="bursts of near-copies per image")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--strategies", default=None, help=f"comma-separated of {', '.join(STRATEGIES)}")
    p.add_argument("--max-labels", type=int, default=200)
    p.add_argument("--round-labels", type=int, default=10)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument(
        "--min-steps", type=int, default=100, help="steps per fine-tuning round, at least"
    )
    p.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    p.add_argument("--full-steps", type=int, default=None, help="steps of the all-labels run")


def run_label_efficiency_bench(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if config.dataset != "digits" and not Path(config.dataset).exists():
        print(f"dataset {config.dataset} not found; skipped")
        return 0
    result = run_bench(config)
    print(table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    if args.plot is not None:
        plot(result, args.plot)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="winnow bench label-efficiency")
    add_arguments(parser)
    return run_label_efficiency_bench(parser.parse_args(argv))
