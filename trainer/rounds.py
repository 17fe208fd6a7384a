"""One backbone round, built aside: split the labels, fine-tune a copy, gate it, spec it.

The CPU/GPU part of a round of AIFT's continuous fine-tuning (Zhou et al.,
CVPR 2017): the labels are split into new ones, earlier ones to replay and a
holdout; a copy of the serving model is fine-tuned on the new labels plus a
replay (:func:`trainer.finetune.finetune_round`), its head refit on the new
backbone's embeddings of every label there is by then (a head fit to frozen
features beats the head fine-tuned with them; see :mod:`trainer.head`),
scored against the serving model on the same holdout
(:func:`trainer.evaluate.release_gate`), and, when the gate lets it through,
given the spec of its release. Nothing here touches
the trainer's state: :class:`~trainer.loop.Trainer` adopts what
:func:`build_round` returns only once the release is published.
"""

import copy
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch
from torch import nn

from schemas.model_spec import ModelSpec
from trainer.architectures import WinnowNet
from trainer.evaluate import Prequential, correct, holdout_weights, is_holdout, release_gate
from trainer.finetune import FinetuneConfig, RoundStats, finetune_round
from trainer.forward import predicted_classes
from trainer.reference import reference_for
from trainer.samples import Sample, SampleCache
from trainer.store import TrainItem

if TYPE_CHECKING:
    from trainer.config import TrainerSettings

log = logging.getLogger(__name__)

RoundTrigger = Literal["labels", "timer", "drift", "manual"]
"""What started a round: enough labels, the timer, a drift alarm, or a direct call."""


@dataclass(frozen=True)
class RoundReport:
    """What one round did, for logs, metrics and the demo."""

    version: str
    released: bool
    new_labels: int
    labels_trained: int
    holdout: int
    candidate_accuracy: float | None
    incumbent_accuracy: float | None
    prequential_accuracy: float
    seconds: float
    reason: str
    trigger: RoundTrigger


@dataclass(frozen=True)
class Split:
    """A round's samples: new ones to train on, earlier ones to replay, and the holdout."""

    train: list[Sample]
    """``new`` and ``replay`` together, in received order."""
    new: list[Sample]
    replay: list[Sample]
    holdout: list[Sample]
    unseen: list[Sample]
    """Every new sample, holdout included: the serving model is scored on them."""


@dataclass(frozen=True)
class BuiltRound:
    """What a round built in its worker thread, for the trainer to adopt after publishing.

    ``model`` and ``spec`` are the candidate to release, or None when the gate
    refused it; ``accuracy`` is the candidate's on the holdout; ``head_fit``
    the frames and labels its head was refit on (holdout excluded), which may
    include labels that came during the round.
    """

    report: RoundReport
    model: WinnowNet | None
    spec: ModelSpec | None
    accuracy: float | None
    prequential: Prequential
    head_fit: dict[str, str]


HeadRefit = Callable[[WinnowNet], tuple[WinnowNet, dict[str, str]]]
"""Refits a candidate's head on its own backbone: the model, and the frames and labels fit."""


class Finetune(Protocol):
    """Trains a model in place as :func:`trainer.finetune.finetune_round` does: that
    function, or :meth:`trainer.round_worker.RoundWorker.finetune` (in a child process)."""

    def __call__(
        self,
        model: nn.Module,
        new: Sequence[Sample],
        replay_pool: Sequence[Sample],
        config: FinetuneConfig,
        device: torch.device,
        progress: Callable[[dict[str, float]], None] | None = None,
    ) -> RoundStats: ...


@dataclass(frozen=True)
class RoundInputs:
    """What a round starts from.

    Attributes:
        model: the serving model (fine-tuned as a copy; never changed).
        spec: the serving model's spec: full, or a head-only release on ``base``.
        base: the spec of the full release whose backbone serves; its
            ``labels_trained`` is what the backbone learned from.
        prequential: the running prequential accuracy, updated as a copy.
        unreleased: frames refused candidates trained on since the last release;
            a release counts them in ``labels_trained``.
    """

    model: WinnowNet
    spec: ModelSpec
    base: ModelSpec
    prequential: Prequential
    unreleased: set[str]


@dataclass(frozen=True)
class RoundSettings:
    """The trainer settings a round reads."""

    holdout_fraction: float
    release_margin: float
    release_alpha: float
    seed: int
    shrink: float | None = None  # None: the architecture's default (FinetuneConfig.for_arch)
    perturb: float | None = None
    class_balance: float = 0.0  # the loss's class weights, rounds and head refits alike
    lr_schedule: Literal["constant", "cosine"] = "constant"
    train_precision: Literal["auto", "fp32", "bf16"] = "auto"

    @classmethod
    def of(cls, settings: "TrainerSettings") -> "RoundSettings":
        """The round's part of the trainer's settings."""
        s = settings
        return cls(
            s.holdout_fraction,
            s.release_margin,
            s.release_alpha,
            s.seed,
            s.shrink,
            s.perturb,
            s.class_balance,
            s.lr_schedule,
            s.train_precision,
        )


def split_items(
    items: list[TrainItem],
    spec: ModelSpec,
    cache: SampleCache,
    read_images: Callable[[list[str]], Mapping[str, bytes]],
    holdout_fraction: float,
) -> Split:
    """Decodes the round's frames (only those not decoded before) and splits them.

    Args:
        items: every trainable frame; the untrained ones are the round's new labels.
        spec: the model's spec: its classes and preprocessing.
        cache: decoded inputs by frame id.
        read_images: the store's image reader.
        holdout_fraction: the held-out share (by a stable hash of the frame id).
    """
    labeled = []
    for item in items:
        if item.label in spec.classes:
            labeled.append((item.frame_id, spec.classes.index(item.label)))
        else:
            log.warning(
                "skipping frame %s: label %r is not a class of the model", item.frame_id, item.label
            )
    samples = cache.samples(labeled, spec, read_images)
    new_ids = {item.frame_id for item in items if item.untrained}
    train = [s for s in samples if not is_holdout(s.frame_id, holdout_fraction)]
    return Split(
        train=train,
        new=[s for s in train if s.frame_id in new_ids],
        replay=[s for s in train if s.frame_id not in new_ids],
        holdout=[s for s in samples if is_holdout(s.frame_id, holdout_fraction)],
        unseen=[s for s in samples if s.frame_id in new_ids],
    )


def build_round(
    start: RoundInputs,
    split: Split,
    settings: RoundSettings,
    device: torch.device,
    trigger: RoundTrigger,
    refit: HeadRefit | None = None,
    finetune: Finetune | None = None,
) -> BuiltRound:
    """Fine-tunes a copy of the serving model, refits its head, gates it and specs it.

    Args:
        start: the serving model and what the round counts from.
        split: the round's samples (:func:`split_items`).
        settings: holdout, gate and seed settings.
        device: where to train.
        trigger: what started the round.
        refit: refits the fine-tuned candidate's head; None keeps the fine-tuned head.
        finetune: trains the candidate: a :class:`~trainer.round_worker.RoundWorker`'s
            in a child process; None: :func:`finetune_round` in this thread.
    """
    started, model, spec = time.perf_counter(), start.model, start.spec
    prequential = scored(start.prequential, model, split.unseen, device)
    candidate, stats = _fit(model, spec, split, settings, device, finetune)
    head_fit: dict[str, str] = {}
    if refit is not None:
        candidate, head_fit = refit(candidate)
    holdout = split.holdout
    candidate_right = correct(candidate, holdout, device) if holdout else None
    incumbent_right = correct(model, holdout, device) if holdout else None
    gate = release_gate(
        candidate_right,
        incumbent_right,
        settings.release_margin,
        alpha=settings.release_alpha,
        weights=holdout_weights(np.array([s.label for s in holdout]), settings.class_balance),
    )
    candidate_acc = None if math.isnan(gate.candidate) else gate.candidate
    incumbent_acc = None if math.isnan(gate.incumbent) else gate.incumbent
    carried = sum(1 for s in split.replay if s.frame_id in start.unreleased)
    # The backbone's count goes on from the full release's backbone: a head's count
    # already holds labels this round learns again.
    backbone = backbone_labels(start.base) + len(split.new) + carried
    labels_trained = max(backbone, len(head_fit))
    version = next_version(start.base, labels_trained)
    log.info(
        "round (trigger=%s): %d new, %d replayed, %d holdout, loss %.4f in %.1fs; %s: %s",
        trigger,
        stats.new,
        stats.replayed,
        len(holdout),
        stats.loss,
        stats.seconds,
        "release " + version if gate.accepted else "rejected",
        gate.reason,
    )
    released = None
    if gate.accepted:
        metrics = round_metrics(candidate_acc, prequential, len(holdout), stats.loss)
        released = spec.model_copy(
            update={
                "version": version,
                "parent_version": spec.version,
                "backbone_version": version,  # a new backbone
                "labels_trained": labels_trained,
                "metrics": {
                    **metrics,
                    "generation": float(generation(start.base) + 1),
                    "backbone_labels": float(backbone),
                },
                "reference": reference_for(candidate, split.train, holdout, device, settings.seed),
            }
        )
    report = RoundReport(
        version=version if gate.accepted else spec.version,
        released=gate.accepted,
        new_labels=len(split.unseen),
        labels_trained=labels_trained if gate.accepted else spec.labels_trained,
        holdout=len(holdout),
        candidate_accuracy=candidate_acc,
        incumbent_accuracy=incumbent_acc,
        prequential_accuracy=prequential.accuracy,
        seconds=time.perf_counter() - started,
        reason=gate.reason,
        trigger=trigger,
    )
    chosen = candidate if gate.accepted else None
    return BuiltRound(report, chosen, released, candidate_acc, prequential, head_fit)


def _fit(
    model: WinnowNet,
    spec: ModelSpec,
    split: Split,
    settings: RoundSettings,
    device: torch.device,
    finetune: Finetune | None,
) -> tuple[WinnowNet, RoundStats]:
    """A fine-tuned copy of ``model``; ``model`` itself is left as it is."""
    candidate = copy.deepcopy(model)
    config = FinetuneConfig.for_arch(
        spec.arch,
        seed=settings.seed,
        shrink=settings.shrink,
        perturb=settings.perturb,
        class_balance=settings.class_balance,
        lr_schedule=settings.lr_schedule,
        train_precision=settings.train_precision,
    )
    stats = (finetune or finetune_round)(
        candidate,
        split.new,
        split.replay,
        config,
        device,
        progress=lambda p: log.debug(
            "round: epoch %d loss %.4f (%.1fs)", int(p["epoch"]), p["loss"], p["seconds"]
        ),
    )
    return candidate, stats


def scored(
    prequential: Prequential, model: WinnowNet, new: list[Sample], device: torch.device
) -> Prequential:
    """``prequential`` with ``model`` scored on labels it has not seen yet (test, then train).

    A copy: the trainer adopts it once the round's labels are marked trained.
    """
    out = copy.deepcopy(prequential)
    if new:
        predicted, labels = predicted_classes(model, new, device)
        for right in (predicted == labels).tolist():
            out.update(bool(right))
    return out


def generation(spec: ModelSpec) -> int:
    """How many backbone rounds the model's lineage has released (0: the first model)."""
    return int(spec.metrics.get("generation", 0))


def backbone_labels(spec: ModelSpec) -> int:
    """The labels the backbone of a full release learned from (its head may know more)."""
    return int(spec.metrics.get("backbone_labels", spec.labels_trained))


def next_version(base: ModelSpec, labels_trained: int) -> str:
    """The version of the next full release after ``base``."""
    return f"{generation(base) + 1:04d}-{labels_trained}l-{secrets.token_hex(3)}"


def round_metrics(
    holdout_acc: float | None, prequential: Prequential, holdout: int, loss: float
) -> dict[str, float]:
    """The metrics a full release's spec carries (NaN ones left out)."""
    out = {
        "prequential_accuracy": prequential.accuracy,
        "holdout_size": float(holdout),
        "train_loss": loss,
    }
    if holdout_acc is not None:
        out["holdout_accuracy"] = holdout_acc
    return {k: float(v) for k, v in out.items() if not np.isnan(v)}
