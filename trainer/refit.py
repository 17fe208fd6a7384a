"""One head refit, built aside: fit the head on cached embeddings, gate it, spec it, pack it.

Between backbone rounds the trainer refits the classification head of the
serving model on the frozen embeddings of every label (the holdout left
out; :func:`trainer.head.fit_head`), scores it against the serving head on
the same holdout with the paired release gate, and, when the gate lets it
through, publishes a head-only release: the head's weights as a
:class:`~schemas.models.HeadArtifact` on the backbone of the full release it
belongs to. The same JSON, saved next to the checkpoints, lets a restarted
trainer serve on from the head it last released.
"""

import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from schemas.drift import DriftReference
from schemas.model_spec import ModelSpec
from schemas.models import HeadArtifact
from trainer.architectures import WinnowNet
from trainer.evaluate import holdout_weights, is_holdout, release_gate
from trainer.finetune import class_weights
from trainer.head import DEFAULT_L2, EmbeddingCache, LinearHead, fit_head, head_of, with_head
from trainer.reference import MIN_HOLDOUT
from trainer.rounds import RoundSettings, generation
from trainer.samples import Sample
from trainer.store import TrainItem

log = logging.getLogger(__name__)

HEAD_FILE = "head.json"
"""The last released head, next to the checkpoints of the full releases."""


@dataclass(frozen=True)
class HeadReport:
    """What one head refit did.

    Attributes:
        version: the head release's version, or the serving one when refused.
        released: whether the gate let the head through.
        labels: labels the head learned from (the holdout excluded).
        holdout: held-out labels the gate compared on.
        candidate_accuracy: the new head's holdout accuracy (None without a holdout).
        incumbent_accuracy: the serving head's.
        seconds: fitting and gating (publishing not included).
        reason: the gate's verdict.
    """

    version: str
    released: bool
    labels: int
    holdout: int
    candidate_accuracy: float | None
    incumbent_accuracy: float | None
    seconds: float
    reason: str


@dataclass(frozen=True)
class BuiltHead:
    """A refit as built in a worker thread, for the trainer to publish and adopt.

    Attributes:
        report: what the refit did.
        fit: the frames the head learned from and their labels (holdout excluded).
        head: the fitted head.
        spec: the head release's spec; None when the gate refused the head.
        model: the serving model with the new head; None when refused.
    """

    report: HeadReport
    fit: dict[str, str]
    head: LinearHead
    spec: ModelSpec | None
    model: WinnowNet | None


def build_head(
    model: WinnowNet,
    spec: ModelSpec,
    base: ModelSpec,
    items: list[TrainItem],
    cache: EmbeddingCache,
    read_images: Callable[[list[str]], Mapping[str, bytes]],
    settings: RoundSettings,
    device: torch.device,
    l2: float = DEFAULT_L2,
    decoded: Mapping[str, Sample] | None = None,
) -> BuiltHead | None:
    """Refits the serving model's head on every label; None when no label can train.

    Args:
        model: the serving model (never changed).
        spec: its spec (full, or a head-only release on ``base``).
        base: the full release whose backbone serves: the cache's key.
        items: every trainable frame.
        cache: embeddings by frame for ``base``'s backbone.
        read_images: the store's image reader.
        settings: holdout and gate settings.
        device: where the backbone embeds new frames.
        l2: the pull towards the serving head, per label.
        decoded: samples already decoded, by frame id (their images are not read).
    """
    started = time.perf_counter()
    labels = {i.frame_id: i.label for i in items if i.label in spec.classes}
    vectors = cache.embeddings(
        model, spec, base.version, list(labels), read_images, device, decoded
    )
    fraction = settings.holdout_fraction
    train = [f for f in labels if f in vectors and not is_holdout(f, fraction)]
    holdout = [f for f in labels if f in vectors and is_holdout(f, fraction)]
    if not train:
        return None
    index = {name: i for i, name in enumerate(spec.classes)}
    x = np.stack([vectors[f] for f in train])
    y = np.array([index[labels[f]] for f in train], dtype=np.int64)
    serving = head_of(model)
    weights = class_weights(y, len(spec.classes), settings.class_balance)
    sample_weight = None if weights is None else weights[y]
    head = fit_head(x, y, len(spec.classes), prior=serving, l2=l2, sample_weight=sample_weight)
    hx = np.stack([vectors[f] for f in holdout]) if holdout else x[:0]
    hy = np.array([index[labels[f]] for f in holdout], dtype=np.int64)
    gate = release_gate(
        head.predict(hx) == hy if holdout else None,
        serving.predict(hx) == hy if holdout else None,
        settings.release_margin,
        alpha=settings.release_alpha,
        weights=holdout_weights(hy, settings.class_balance),
    )
    finite = bool(np.isfinite(head.weight).all() and np.isfinite(head.bias).all())
    accepted = gate.accepted and finite
    version = head_version(base, len(train))
    candidate_acc = None if math.isnan(gate.candidate) else gate.candidate
    released = None
    if accepted:
        reference_x = hx if len(hx) >= MIN_HOLDOUT else np.concatenate([x, hx])
        released = spec.model_copy(
            update={
                "version": version,
                "parent_version": spec.version,
                "backbone_version": base.version,  # the base's backbone, a new head
                "labels_trained": len(train),
                "metrics": _metrics(base, candidate_acc, len(holdout)),
                "reference": _reference(reference_x, head, settings.seed),
            }
        )
    report = HeadReport(
        version=version if accepted else spec.version,
        released=accepted,
        labels=len(train),
        holdout=len(holdout),
        candidate_accuracy=candidate_acc,
        incumbent_accuracy=None if math.isnan(gate.incumbent) else gate.incumbent,
        seconds=time.perf_counter() - started,
        reason=gate.reason if finite else "the fitted head is not finite",
    )
    fit = {f: labels[f] for f in train}
    return BuiltHead(report, fit, head, released, with_head(model, head) if accepted else None)


def head_version(base: ModelSpec, labels: int) -> str:
    """A head release's version: its backbone's generation, its label count, ``h``."""
    return f"{generation(base):04d}-{labels}l-h-{secrets.token_hex(3)}"


def _metrics(base: ModelSpec, holdout_acc: float | None, holdout: int) -> dict[str, float]:
    out = {"generation": float(generation(base)), "holdout_size": float(holdout)}
    if holdout_acc is not None:
        out["holdout_accuracy"] = holdout_acc
    return out


def _reference(embeddings: np.ndarray, head: LinearHead, seed: int) -> DriftReference | None:
    """The drift reference of the new head: the same embeddings, its own class mix."""
    if len(embeddings) < 2:
        return None
    logits = head.logits(embeddings).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return DriftReference.build(embeddings, probabilities, seed=seed)


def head_artifact(spec: ModelSpec, base_version: str, head: LinearHead, dropout: float) -> bytes:
    """The artifact of a head-only release: :class:`~schemas.models.HeadArtifact` JSON.

    Each weight is written in the shortest decimal form that reads back as the
    same float32, so the scorer serves exactly the trainer's head in a small
    artifact.
    """
    artifact = HeadArtifact(
        base_version=base_version,
        spec=spec,
        weight=[_shortest(row) for row in head.weight],
        bias=_shortest(head.bias),
        dropout=dropout,
    )
    return artifact.model_dump_json().encode()


def _shortest(values: np.ndarray) -> list[float]:
    # numpy prints a float32 in its shortest round-tripping form; Python's float of that
    # text prints the same text back, so JSON gets the short form.
    return [float(str(v)) for v in np.asarray(values, dtype=np.float32)]


def refit_wait(learned: int, every: int, share: float) -> int:
    """New labels a head refit waits for: ``every``, or ``share`` of what the last one learned.

    A refit fits every label, so its cost grows with the labels; waiting for a
    share of them keeps the refits' total cost in step with the labels (each
    label is refit about ``1 / share`` times over its life) instead of growing
    with their square, and the labels not yet learned stay under that share.

    Args:
        learned: the labels the last refit (or round) learned from.
        every: the fewest new labels (``head_refit_labels``).
        share: the share of ``learned`` (``head_refit_share``).
    """
    return max(every, math.ceil(share * learned))


def unlearned(
    pending: Iterable[TrainItem], covered: Mapping[str, str], holdout_fraction: float
) -> int:
    """Answered labels, holdout excluded, that the serving release did not learn from.

    Args:
        pending: frames whose label no full release learned from (the store's
            ``pending()``).
        covered: the frames and labels the serving head-only release learned
            from (empty when a full release serves).
        holdout_fraction: the held-out share, never learned from.
    """
    return sum(
        1
        for item in pending
        if not is_holdout(item.frame_id, holdout_fraction)
        and covered.get(item.frame_id) != item.label
    )


def save_head(directory: Path, artifact: bytes) -> None:
    """Writes the released head next to the checkpoints (temporary file, fsync, rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    path, tmp = directory / HEAD_FILE, directory / f".{HEAD_FILE}.tmp"
    with open(tmp, "wb") as f:
        f.write(artifact)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def restore_head(directory: Path, model: WinnowNet, spec: ModelSpec) -> tuple[WinnowNet, ModelSpec]:
    """``model`` and ``spec`` with the last released head, if it belongs to this backbone.

    A head saved for another backbone (one a later round replaced), or a file
    that does not read, is ignored: the full release serves.
    """
    try:
        saved = HeadArtifact.model_validate_json((directory / HEAD_FILE).read_bytes())
    except FileNotFoundError:
        return model, spec
    except (OSError, ValidationError) as exc:
        log.warning("ignoring the saved head in %s: %s", directory, exc)
        return model, spec
    if saved.base_version != spec.version:
        return model, spec
    head = LinearHead(
        np.asarray(saved.weight, dtype=np.float32), np.asarray(saved.bias, dtype=np.float32)
    )
    log.info("serving on from head release %s on %s", saved.spec.version, spec.version)
    return with_head(model, head), saved.spec
