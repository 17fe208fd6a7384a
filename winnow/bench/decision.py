"""``winnow bench decision``: CPU time of the query decision a frame, per strategy.

What is timed is ``QueryPolicy.decide`` alone, the call the scorer makes once a
batch after scoring (the utilities, the stream filters, the strategy and the
budget, cap and backpressure gates), on a synthetic stream: ``--classes``
Gaussian clusters in ``--dim`` dimensions as the embeddings, softmax
probabilities that mostly name the frame's cluster, and the probability
utilities of ``service.scoring.uncertainty`` (any other utility a strategy
compares, ``aift`` or ``bald`` for one, is drawn uniformly: computing it is
scoring, not deciding). BLAS is kept to one thread, as the scorer keeps it.

Each strategy is timed in the phases the scorer goes through: ``cold`` (no model
yet: the cold start alone), ``warming`` (a model, fewer labels per class than
``COLD_START_PER_CLASS``: the cold start with the filters and the uncertainty
blend) and ``steady`` (the strategy itself). Every frame asked for is answered
at once with its cluster as the label, so the class-aware filters and the
competence blend see labels. A phase first runs ``--warmup`` batches (memories
fill), then ``--repeats`` passes of ``--batches`` batches; the figure is the
best pass's thread CPU time a frame (the least disturbed by other work on the
machine), with the median and the wall time beside it.
"""

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from winnow.bench.efficiency.errors import BenchConfigError
from winnow.bench.efficiency.specs import STRATEGIES, StrategySpec, given_specs

log = logging.getLogger(__name__)

PHASES = ("cold", "warming", "steady")
DEFAULT_STRATEGIES = (
    "default",
    "variable",
    "quantile",
    "herding",
    "probcover",
    "typiclust",
    "vessal",
)
"""The scorer as shipped, then each strategy by name with the default utility and filters."""


@dataclass(frozen=True)
class DecisionConfig:
    """One run's stream and timing.

    Attributes:
        batch: frames a batch (the scorer's batch size).
        dim: embedding dimensions.
        classes: classes (clusters of the stream).
        budget: fraction of frames that may be asked for.
        batches: batches a timed pass.
        repeats: timed passes a phase.
        warmup: untimed batches before the passes of a phase.
        seed: the stream and the policies' seed.
    """

    batch: int = 32
    dim: int = 128
    classes: int = 10
    budget: float = 0.05
    batches: int = 200
    repeats: int = 3
    warmup: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.batch, self.dim, self.batches, self.repeats) < 1 or self.warmup < 0:
            raise BenchConfigError("batch, dim, batches and repeats must be positive")
        if self.classes < 2:
            raise BenchConfigError("a stream needs at least 2 classes")
        if not 0 < self.budget <= 1:
            raise BenchConfigError("the budget is a fraction in (0, 1]")


class SyntheticStream:
    """Clustered embeddings with probabilities that mostly name their cluster."""

    def __init__(self, config: DecisionConfig) -> None:
        self._rng = np.random.default_rng(config.seed)
        self._config = config
        self._centres = self._rng.normal(
            scale=3.0 / np.sqrt(config.dim), size=(config.classes, config.dim)
        )

    def batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Embeddings (N, D), probabilities (N, C) and the true classes (N,) of one batch."""
        config, rng = self._config, self._rng
        labels = rng.integers(config.classes, size=config.batch)
        noise = rng.normal(scale=1.0 / np.sqrt(config.dim), size=(config.batch, config.dim))
        embeddings = (self._centres[labels] + noise).astype(np.float32)
        logits = 3.0 * embeddings @ self._centres.T / np.square(self._centres).sum(1).mean()
        logits += rng.normal(scale=1.0, size=logits.shape)
        exp = np.exp(logits - logits.max(1, keepdims=True))
        return embeddings, (exp / exp.sum(1, keepdims=True)).astype(np.float32), labels


def time_strategy(
    spec: StrategySpec, config: DecisionConfig, clock: Callable[[], float] = time.thread_time
) -> dict[str, dict[str, float | str]]:
    """Times one strategy through the phases; per phase the CPU and wall µs a frame.

    Raises:
        BenchConfigError: a peer (it is not the scorer's decision) or settings the
            policy refuses.
    """
    from service.scoring.uncertainty import score_batch
    from service.selection.filters import DecisionContext
    from service.selection.policy import QueryPolicy

    if spec.peer is not None:
        raise BenchConfigError(f"{spec.peer} is a scikit-activeml peer, not the scorer's decision")
    settings = spec.policy_settings(budget=config.budget, window=1000, seed=config.seed)
    try:
        policy = QueryPolicy.from_settings(settings)
    except ValueError as error:
        raise BenchConfigError(str(error)) from None
    classes = [f"c{k}" for k in range(config.classes)]
    stream = SyntheticStream(config)
    uniform = np.random.default_rng(config.seed + 1)
    sources: list[str | None] = ["cam"] * config.batch
    out: dict[str, dict[str, float | str]] = {}
    for phase in PHASES:
        policy.on_model(labels_trained=_LABELS_TRAINED[phase], classes=classes)
        batches: list[_Batch] = []
        for _ in range(config.warmup + config.batches * config.repeats):
            embeddings, probabilities, labels = stream.batch()
            scores = score_batch(probabilities)
            for name in policy.needs - scores.keys():
                scores[name] = uniform.random(len(probabilities))
            context = DecisionContext(embeddings, probabilities, sources)
            batches.append(_Batch(scores, context, probabilities.argmax(1), labels))
        _decide(policy, batches[: config.warmup], classes)
        cpu, wall, selected = [], [], 0
        for r in range(config.repeats):
            start = config.warmup + r * config.batches
            t_cpu, t_wall = clock(), time.perf_counter()
            selected += _decide(policy, batches[start : start + config.batches], classes)
            cpu.append(clock() - t_cpu)
            wall.append(time.perf_counter() - t_wall)
        frames = config.batches * config.batch
        out[phase] = {
            "cpu_us_per_frame": round(min(cpu) / frames * 1e6, 2),
            "cpu_us_per_frame_median": round(statistics.median(cpu) / frames * 1e6, 2),
            "wall_us_per_frame": round(min(wall) / frames * 1e6, 2),
            "selected_fraction": round(selected / (frames * config.repeats), 4),
            "leading": "cold start" if policy.cold_start or policy.warming else "strategy",
        }
    return out


_LABELS_TRAINED = {"cold": 0, "warming": 1, "steady": 10**9}
"""The labels the serving model has learned from in each phase (``QueryPolicy.on_model``)."""


@dataclass(frozen=True)
class _Batch:
    scores: dict[str, np.ndarray]
    context: Any  # DecisionContext
    predicted: np.ndarray
    labels: np.ndarray


def _decide(policy: Any, batches: Sequence[_Batch], classes: Sequence[str]) -> int:
    """Decides the batches, answering each frame asked for at once; how many were asked for."""
    selected = 0
    for batch in batches:
        for i, row in enumerate(policy.decide(batch.scores, batch.context)):
            if row["selected"]:
                selected += 1
                policy.on_answer(classes[int(batch.predicted[i])], classes[int(batch.labels[i])])
    return selected


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, default=Path("decision.json"))
    p.add_argument(
        "--strategies",
        help=f"comma-separated names (default {','.join(DEFAULT_STRATEGIES)}); a threshold or "
        "embedding strategy's name, or one of label-efficiency's built-in strategies",
    )
    p.add_argument(
        "--strategy-spec",
        action="append",
        default=[],
        metavar="NAME=POLICY:UTILITY:FILTERS:SELECTOR",
        help="a strategy by its policy settings (filters joined by +); repeatable",
    )
    p.add_argument("--strategy-specs", type=Path, help="JSON object of name to policy settings")
    defaults = DecisionConfig()
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--dim", type=int, default=defaults.dim, help="embedding dimensions")
    p.add_argument("--classes", type=int, default=defaults.classes)
    p.add_argument("--budget", type=float, default=defaults.budget)
    p.add_argument("--batches", type=int, default=defaults.batches, help="batches a timed pass")
    p.add_argument("--repeats", type=int, default=defaults.repeats, help="timed passes a phase")
    p.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed batches first")
    p.add_argument("--seed", type=int, default=defaults.seed)


def _strategies(args: argparse.Namespace) -> dict[str, StrategySpec]:
    from service.selection.registry import STRATEGIES as POLICY_NAMES

    extra = given_specs(args.strategy_specs, args.strategy_spec)
    names = args.strategies.split(",") if args.strategies else [*DEFAULT_STRATEGIES, *extra]
    if left := [n for n in extra if n not in names]:
        log.warning("given but not named in --strategies, so not run: %s", ", ".join(left))
    chosen: dict[str, StrategySpec] = {}
    for name in (n.strip() for n in names if n.strip()):
        if name in extra:
            chosen[name] = extra[name]
        elif name in STRATEGIES:
            chosen[name] = STRATEGIES[name]
        elif name in POLICY_NAMES:
            chosen[name] = StrategySpec(settings={"name": name})
        else:
            known = sorted({*STRATEGIES, *POLICY_NAMES, *extra})
            raise BenchConfigError(f"unknown strategy {name!r}; known: {', '.join(known)}")
    return chosen


def run_decision_bench(args: argparse.Namespace) -> int:
    """The command: every strategy through the phases, a table on stdout, JSON to ``--json``."""
    from infra import blas

    try:
        config = DecisionConfig(
            batch=args.batch,
            dim=args.dim,
            classes=args.classes,
            budget=args.budget,
            batches=args.batches,
            repeats=args.repeats,
            warmup=args.warmup,
            seed=args.seed,
        )
        chosen = _strategies(args)
    except BenchConfigError as error:
        print(f"winnow bench decision: {error}", file=sys.stderr)
        return 2
    load_before = round(os.getloadavg()[0], 2)
    results: dict[str, Any] = {}
    blas.acquire()
    try:
        for index, (name, spec) in enumerate(chosen.items(), 1):
            print(f"[{index}/{len(chosen)}] {name}", file=sys.stderr, flush=True)
            try:
                phases = time_strategy(spec, config)
            except BenchConfigError as error:
                print(f"winnow bench decision: {name}: {error}", file=sys.stderr)
                return 2
            results[name] = {"spec": spec.describe(), "phases": phases}
    finally:
        blas.release()
    report = {
        "bench": "decision",
        "config": config.__dict__,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_1m_before": load_before,
            "load_average_1m_after": round(os.getloadavg()[0], 2),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "strategies": results,
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(f"wrote {args.json}")
    return 0


def table(results: Mapping[str, Any]) -> str:
    """Markdown: CPU µs a frame (best pass) per strategy and phase."""
    lines = ["| strategy | " + " | ".join(PHASES) + " |", "|---" * (len(PHASES) + 1) + "|"]
    for name, result in results.items():
        cells = [f"{result['phases'][p]['cpu_us_per_frame']:.1f}" for p in PHASES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
