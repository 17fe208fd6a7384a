"""``winnow bench label-efficiency``: labels each query strategy needs, against random sampling.

Protocol (the parts live in ``winnow.bench.efficiency``):

- Paired seeds: per seed, every strategy sees the same stream order, test
  split and initial weights, and is trained by the same learner, so the
  strategies of one seed differ only in which frames they ask for.
- The learner is the trainer's: ``finetune_round`` every ``--round-labels``
  labels and, where the trainer has them, head refits on frozen embeddings in
  between; random sampling gets the same learner. ``--pseudo-labels`` adds
  labels spread over the unlabeled frames seen (``trainer.pseudo``).
- The full-data measure is the same learner given every training label; the
  targets are 90/95/98% of it.
- Per seed, labels-to-target is read off the isotonic (monotone) fit of the
  curve by linear interpolation; ``savings_vs_random`` is the geometric mean
  over seeds of random's labels over the strategy's at 95%, with a bootstrap
  interval (``savings_ci``), the share of seeds at 2x or more, and the
  normalised area under the curve.
- The measure is balanced accuracy when a class is under its share limit of
  the stream (30% for two classes), accuracy otherwise; ``--imbalance``
  builds such a stream, ``--video`` a stream of near-duplicate bursts.
- Every strategy and peer is also compared at equal label counts.
"""

import argparse
import dataclasses
import json
import logging
import multiprocessing
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from winnow.bench.efficiency.curves import accuracy, balanced_accuracy
from winnow.bench.efficiency.errors import BenchConfigError
from winnow.bench.efficiency.learner import LearnerConfig, resolve_head_refit, trainer_cadence
from winnow.bench.efficiency.report import RATIOS, plot, summarize, table
from winnow.bench.efficiency.run import RunConfig, RunResult, init_worker, run_one
from winnow.bench.efficiency.specs import (
    DEFAULT_STRATEGIES,
    IMBALANCE_DEFAULT_STRATEGIES,
    STRATEGIES,
    VIDEO_DEFAULT_STRATEGIES,
    SpecError,
    StrategySpec,
    given_specs,
    resolve,
)
from winnow.bench.efficiency.stream import StreamConfig, StreamData, prepare

log = logging.getLogger(__name__)

STRATEGY_KEYS = (
    "labels",
    "measure_mean",
    "measure_std",
    "labels_to_target",
    "savings_vs_random",
    "savings_ci",
    "share_2x",
    "aulc",
    "at_labels",
    "seeds",
)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark: a stream, the strategies, the seeds and how each run goes.

    Attributes:
        stream: the dataset and how it is streamed.
        run: budget, batches, label budget and the learner.
        strategies: name to spec, random first.
        seeds: the paired seeds.
        full_seeds: full-data runs, averaged into the reference: on seeds 0, 1, ... (at most
            as many as ``seeds``) whichever the paired seeds are, so that a run over further
            seeds of the same stream (``--first-seed``) has the same targets and its seeds
            can be pooled with an earlier run's.
        workers: processes, one torch thread each.
        resamples: bootstrap draws.
    """

    stream: StreamConfig = field(default_factory=StreamConfig)
    run: RunConfig = field(default_factory=RunConfig)
    strategies: dict[str, StrategySpec] = field(
        default_factory=lambda: {n: STRATEGIES[n] for n in DEFAULT_STRATEGIES}
    )
    seeds: tuple[int, ...] = tuple(range(10))
    full_seeds: int = 3
    workers: int = 2
    resamples: int = 2000


def check_strategies(config: BenchConfig) -> None:
    """Builds every strategy's policy once, so a bad spec fails before hours of runs.

    Raises:
        SpecError: settings the policy refuses, or AIFT on cached features.
    """
    from skactiveml import stream

    from service.scoring.aift import AIFT_UTILITIES
    from service.selection.policy import QueryPolicy

    for name, spec in config.strategies.items():
        try:
            settings = spec.policy_settings(budget=config.run.budget, window=config.run.window)
            QueryPolicy.from_settings(settings)
        except (SpecError, ValueError, KeyError) as error:
            raise SpecError(f"strategy {name}: {error}") from None
        if spec.peer is not None and not hasattr(stream, spec.peer):
            raise SpecError(f"strategy {name}: skactiveml.stream has no {spec.peer!r}")
        if config.stream.pretrained and spec.peer is None and settings.utility in AIFT_UTILITIES:
            raise SpecError(
                f"strategy {name}: AIFT needs views through the backbone; with --pretrained "
                "the backbone's features are cached, so choose another utility"
            )


def _full_one(job: tuple[int, LearnerConfig, bool]) -> tuple[int, list[list[int]]]:
    from winnow.bench.efficiency import run
    from winnow.bench.efficiency.learner import full_data_confusion, trainer_head_refit

    seed, learner, refits = job
    assert run._DATA is not None
    refit = trainer_head_refit(learner.class_balance) if refits else None
    return seed, full_data_confusion(run._DATA, learner, seed, refit).tolist()


def run_bench(config: BenchConfig, data: StreamData | None = None) -> dict[str, Any]:
    """Runs every strategy for every seed (in ``workers`` processes) and summarizes.

    Raises:
        BenchConfigError: a strategy that cannot run, head refits asked for and
            missing, a stream the dataset cannot give.
    """
    import numpy as np

    started = time.perf_counter()
    check_strategies(config)  # before the data: preparing it may take minutes
    refits = resolve_head_refit(config.run.head_refits) is not None
    data = data if data is not None else prepare(config.stream)
    prepared = time.perf_counter() - started
    run = dataclasses.replace(config.run, head_refits=refits, video=config.stream.video)
    jobs = [
        (name, spec, seed, run) for seed in config.seeds for name, spec in config.strategies.items()
    ]
    full_jobs = [
        (seed, run.learner, refits) for seed in range(min(config.full_seeds, len(config.seeds)))
    ]
    results: dict[str, list[RunResult]] = {name: [] for name in config.strategies}
    fulls: list[tuple[int, list[list[int]]]] = []
    context = multiprocessing.get_context("spawn")
    with context.Pool(config.workers, initializer=init_worker, initargs=(data,)) as pool:
        pending_full = pool.map_async(_full_one, full_jobs)
        for result in pool.imap_unordered(run_one, jobs):
            results[result.name].append(result)
            log.info(
                "done strategy=%s seed=%d final=%.3f labels=%d in %.0fs",
                result.name,
                result.seed,
                result.accuracy[-1],
                result.labels[-1],
                result.seconds,
            )
        fulls = pending_full.get()
    measure_fn = balanced_accuracy if data.measure == "balanced_accuracy" else accuracy
    full_values = [measure_fn(np.array(counts)) for _, counts in sorted(fulls)]
    full = float(np.mean(full_values))
    peers = {name for name, spec in config.strategies.items() if spec.peer is not None}
    strategies = summarize(results, peers, full, data.measure, run.max_labels, config.resamples)
    return {
        "dataset": config.stream.dataset,
        "stream": data.info,
        "video": config.stream.video,
        "imbalance": config.stream.imbalance,
        "measure": data.measure,
        "config": _config_record(config, run),
        "full": {
            "mean": round(full, 4),
            "exact": full,  # the targets' base, unrounded, for --merge
            "per_seed": [round(v, 4) for v in full_values],
            "seeds": [seed for seed, _ in sorted(fulls)],
        },
        "targets": {str(r): round(r * full, 4) for r in RATIOS},
        "strategies": strategies,
        "seconds": round(time.perf_counter() - started, 1),
        "prepare_seconds": round(prepared, 1),
    }


def _config_record(config: BenchConfig, run: RunConfig) -> dict[str, Any]:
    return {
        "stream": dataclasses.asdict(config.stream),
        "run": dataclasses.asdict(run),
        "seeds": list(config.seeds),
        "full_seeds": config.full_seeds,
        "workers": config.workers,
        "resamples": config.resamples,
        "strategies": {name: spec.describe() for name, spec in config.strategies.items()},
    }


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The benchmark the command line describes.

    Raises:
        BenchConfigError: an unknown strategy, a spec that cannot be parsed, or
            head refits asked for where the trainer has none, or no seed.
    """
    if args.seeds < 1 or args.first_seed < 0:
        raise BenchConfigError(
            f"--seeds must be at least 1 and --first-seed not negative "
            f"(got {args.seeds} and {args.first_seed})"
        )
    if args.refit_share is not None and not 0 <= args.refit_share <= 1:
        raise BenchConfigError(f"--refit-share must be in [0, 1] (got {args.refit_share})")
    extra = given_specs(args.strategy_specs, args.strategy_spec)
    names = (
        [n.strip() for n in args.strategies.split(",") if n.strip()] if args.strategies else None
    )
    round_default, refit_default, share_default = trainer_cadence()
    # Unsaid, refits are on where the trainer refits by default and has the function.
    wanted = (
        args.head_refits if args.head_refits is not None else (None if refit_default else False)
    )
    refits = resolve_head_refit(wanted) is not None
    default = (
        VIDEO_DEFAULT_STRATEGIES
        if args.video
        else IMBALANCE_DEFAULT_STRATEGIES
        if args.imbalance is not None
        else DEFAULT_STRATEGIES
    )
    return BenchConfig(
        stream=StreamConfig(
            dataset=args.dataset,
            video=args.video,
            burst=args.burst,
            imbalance=args.imbalance,
            minority=args.minority,
            measure=args.measure,
            pretrained=args.pretrained,
            input_size=args.input_size,
            workers=args.workers,
        ),
        run=RunConfig(
            budget=args.budget,
            window=args.window,
            batch=args.batch,
            max_labels=args.max_labels,
            max_passes=args.max_passes,
            video=args.video,
            learner=LearnerConfig(
                round_labels=args.round_labels or round_default,
                refit_labels=args.refit_labels or refit_default or 1,
                refit_share=share_default if args.refit_share is None else args.refit_share,
                min_steps=args.min_steps,
                full_steps=args.full_steps,
                pseudo=args.pseudo_labels,
                shrink=args.shrink,
                perturb=args.perturb,
                lr_schedule=args.lr_schedule,
                train_precision=_train_precision(args.train_precision),
                class_balance=(
                    _trainer_class_balance() if args.class_balance is None else args.class_balance
                ),
            ),
            head_refits=refits,
        ),
        strategies=resolve(names, extra, default),
        seeds=tuple(range(args.first_seed, args.first_seed + args.seeds)),
        full_seeds=args.full_seeds,
        workers=args.workers,
        resamples=args.resamples,
    )


def _serve_budget() -> float:
    """The budget ``winnow serve`` uses unless told otherwise (``PolicySettings``' default)."""
    from service.config import PolicySettings

    return float(PolicySettings.model_fields["budget"].default)


def _trainer_class_balance() -> float:
    """The trainer's class weighting unless told otherwise (``TrainerSettings``' default)."""
    from trainer.config import TrainerSettings

    return float(TrainerSettings.model_fields["class_balance"].default)


def _train_precision(asked: str | None) -> str:
    """The rounds' arithmetic that ``asked`` (None: the trainer's default) means on this
    machine's CPU, where the benchmark trains: ``fp32`` or ``bf16``."""
    import torch

    from trainer.config import TrainerSettings
    from trainer.finetune import FinetuneConfig, training_dtype

    precision = asked or str(TrainerSettings.model_fields["train_precision"].default)
    # Every learner of the benchmark trains with the small CNN's configuration (the head
    # over cached features too: learner.finetune_config).
    precision = FinetuneConfig.for_arch("small-cnn", train_precision=precision).train_precision
    return "fp32" if training_dtype(precision, torch.device("cpu")) is None else "bf16"


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _unit_interval(text: str) -> float:
    value = _non_negative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be at most 1, got {text}")
    return value


def _shrink(text: str) -> float:
    value = _non_negative(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's options (``winnow bench label-efficiency``)."""
    p.add_argument("--dataset", default="digits", help="digits, or a MedMNIST-layout .npz")
    p.add_argument("--json", type=Path, default=Path("label-efficiency.json"))
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="RESULT",
        help="run nothing: pool the seeds of these JSONs (runs of the same benchmark over "
        "other seeds, see --first-seed) into --json, every summary computed again",
    )
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--video", action="store_true", help="bursts of near-copies per image")
    p.add_argument("--burst", type=int, default=5, help="frames per video burst")
    p.add_argument(
        "--imbalance",
        type=float,
        default=None,
        help="subsample one class to this share of the stream (e.g. 0.1)",
    )
    p.add_argument("--minority", type=int, default=None, help="that class (default the rarest)")
    p.add_argument(
        "--measure",
        choices=["auto", "accuracy", "balanced_accuracy"],
        default="auto",
        help="auto: balanced accuracy when a class is under 0.6/C of the stream",
    )
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="frozen EfficientNet-Lite0 features (cached once) for camera-sized .npz",
    )
    p.add_argument("--input-size", type=int, default=None, help="model input side")
    p.add_argument("--seeds", type=int, default=10, help="paired seeds")
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="the first paired seed (10 with --seeds 10 runs seeds 10 to 19; the full-data "
        "reference stays on seeds 0, 1, 2, so the targets match a run from 0)",
    )
    p.add_argument(
        "--strategies",
        default=None,
        help=f"comma-separated names; built in: {', '.join(STRATEGIES)}",
    )
    p.add_argument(
        "--strategy-spec",
        action="append",
        metavar="NAME=POLICY:UTILITY:FILTERS:SELECTOR",
        help="a strategy by its policy settings (filters joined by +); repeatable",
    )
    p.add_argument(
        "--strategy-specs", type=Path, default=None, help="JSON object of name to policy settings"
    )
    p.add_argument("--max-labels", type=int, default=200)
    p.add_argument(
        "--round-labels",
        type=int,
        default=None,
        help="labels per fine-tuning round (default the trainer's round_min_labels)",
    )
    p.add_argument(
        "--refit-labels",
        type=int,
        default=None,
        help="labels per head refit (default the trainer's head_refit_labels)",
    )
    p.add_argument(
        "--refit-share",
        type=float,
        default=None,
        help="a head refit also waits for this share of the labels so far (default the "
        "trainer's head_refit_share; 0: every --refit-labels)",
    )
    p.add_argument(
        "--head-refits",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="head refits after and between rounds (default: as the trainer does)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=_serve_budget(),
        help="fraction of frames that may be asked for "
        "(default the scorer's, WINNOW_POLICY_BUDGET)",
    )
    p.add_argument(
        "--pseudo-labels",
        type=_non_negative,
        default=0.0,
        metavar="PER_LABEL",
        help="rounds and refits also learn from up to PER_LABEL pseudo-labels per label, "
        "spread from the labels over the frames seen (trainer.pseudo; the trainer does "
        "not collect unlabeled frames yet); default 0, off",
    )
    p.add_argument(
        "--shrink",
        type=_shrink,
        default=None,
        help="before each round on every label, each weight times this (shrink and perturb, "
        "Ash and Adams 2020; the trainer's WINNOW_TRAINER_SHRINK); 1: off; default the "
        "trainer's for the architecture (0.6 for the small CNN)",
    )
    p.add_argument(
        "--perturb",
        type=_non_negative,
        default=None,
        metavar="SIGMA",
        help="and Gaussian noise of this standard deviation (WINNOW_TRAINER_PERTURB); default "
        "the trainer's for the architecture (0.01 for the small CNN)",
    )
    p.add_argument(
        "--train-precision",
        choices=("auto", "fp32", "bf16"),
        default=None,
        help="the rounds' arithmetic (WINNOW_TRAINER_TRAIN_PRECISION): bf16 autocast or "
        "fp32; default the trainer's (auto: bf16 on a CPU with AMX, fp32 elsewhere); the "
        "result records which one ran",
    )
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default=None,
        help="the rounds' learning rate: constant, or lowered to 0 over each round along half "
        "a cosine (WINNOW_TRAINER_LR_SCHEDULE); default the trainer's",
    )
    p.add_argument(
        "--class-balance",
        type=_unit_interval,
        default=None,
        metavar="POWER",
        help="weigh each class in the loss by (mean count / its count) ** POWER in rounds, "
        "refits and the full-data run (WINNOW_TRAINER_CLASS_BALANCE); default the trainer's",
    )
    p.add_argument("--window", type=int, default=200, help="frames of the budget window")
    p.add_argument("--batch", type=int, default=32, help="frames per scoring batch")
    p.add_argument("--max-passes", type=int, default=6, help="passes over the stream at most")
    p.add_argument(
        "--min-steps",
        type=int,
        default=None,
        help="steps per fine-tuning round, at least (default the trainer's for the architecture)",
    )
    p.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    p.add_argument("--full-steps", type=int, default=None, help="steps of the all-labels run")
    p.add_argument("--full-seeds", type=int, default=3, help="all-labels runs averaged")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap draws")


def run_label_efficiency_bench(args: argparse.Namespace) -> int:
    """Runs the command: prints the table, writes the JSON (and the plot)."""
    if args.merge is not None:
        return _merge(args)
    if args.dataset != "digits" and not Path(args.dataset).exists():
        print(f"dataset {args.dataset} not found; skipped")
        return 0
    try:
        config = config_from_args(args)
        result = run_bench(config)
    except BenchConfigError as error:
        print(f"winnow bench label-efficiency: {error}", file=sys.stderr)
        return 2
    return _report(result, args)


def _report(result: dict[str, Any], args: argparse.Namespace) -> int:
    """Prints the table, writes the JSON (and the plot)."""
    print(table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    if args.plot is not None:
        plot(result, args.plot)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from winnow.bench.efficiency.merge import merge_results

    try:
        results = [json.loads(path.read_text()) for path in args.merge]
        result = merge_results(results, [str(path) for path in args.merge])
    except KeyError as error:
        print(
            f"winnow bench label-efficiency --merge: not a label-efficiency result (no {error})",
            file=sys.stderr,
        )
        return 2
    except (OSError, ValueError, TypeError) as error:
        print(f"winnow bench label-efficiency --merge: {error}", file=sys.stderr)
        return 2
    return _report(result, args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="winnow bench label-efficiency")
    add_arguments(parser)
    return run_label_efficiency_bench(parser.parse_args(argv))
