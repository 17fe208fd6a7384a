"""Creates the first model version: build, seed, export, verify.

Normalization defaults: what the architecture's pretrained weights expect
where ``trainer.architectures.INPUT_NORMALIZATION`` says (EfficientNet-Lite0:
``(x - 127) / 128`` on every channel, grayscale included, since the network
repeats a gray channel to three); otherwise ImageNet's mean and std for RGB
(what torchvision checkpoints expect, so a local ImageNet checkpoint works
unchanged), and 0.5 / 0.5 for grayscale, which maps pixel values to [-1, 1].
"""

import hashlib
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from schemas.model_spec import ModelSpec, Precision
from trainer.architectures import INPUT_NORMALIZATION, build_model
from trainer.errors import ModelBuildError
from trainer.export import check_parity, export_onnx

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.5,)
GRAY_STD = (0.5,)


def default_normalization(
    channels: int, arch: str | None = None
) -> tuple[list[float], list[float]]:
    """Returns ``(mean, std)`` for a channel count and architecture (see the module docstring)."""
    if arch in INPUT_NORMALIZATION:
        mean, std = INPUT_NORMALIZATION[arch]
        return [mean] * channels, [std] * channels
    if channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return list(GRAY_MEAN), list(GRAY_STD)


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch so that a model is reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_model(
    classes: list[str],
    input_size: int | tuple[int, int],
    arch: str,
    out: Path,
    channels: int = 3,
    weights: Path | None = None,
    seed: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pretrained: bool = False,
    precision: Precision = "fp32",
) -> ModelSpec:
    """Builds a fresh model, exports it to ``out`` and checks ONNX parity.

    The version is ``0-init-<first 8 hex of the sha256 of the file written
    with a placeholder version>``: the same arguments and seed give the same
    version, different weights a different one.

    Args:
        classes: class names, in output order.
        input_size: side length, or ``(height, width)``.
        arch: an architecture name from ``trainer.architectures``.
        out: the ``.onnx`` file to write.
        channels: 1 (grayscale) or 3 (RGB).
        weights: an optional local checkpoint for the backbone.
        seed: seeds the random initialization (of the head, when pretrained).
        mean: per-channel mean; the default depends on ``channels`` and ``arch``.
        std: per-channel std; the default depends on ``channels`` and ``arch``.
        pretrained: load the ImageNet weights packaged for ``arch`` into the
            backbone (``efficientnet_lite0``); not together with ``weights``.
        precision: the arithmetic inside the graph (``trainer.export``); fp16 is
            checked against the float32 model with wider tolerances.

    Returns:
        The spec written into the file's metadata.

    Raises:
        ModelBuildError: bad arguments.
        ModelExportError: export failed or parity did not hold.
    """
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 2 or min(size) < 8:
        raise ModelBuildError(f"input size must be at least 8x8 pixels, got {input_size}")
    if channels not in (1, 3):
        raise ModelBuildError(f"channels must be 1 or 3, got {channels}")
    default_mean, default_std = default_normalization(channels, arch)
    seed_everything(seed)
    model = build_model(arch, len(classes), channels, weights, pretrained=pretrained)
    spec_fields = {
        "arch": arch,
        "classes": list(classes),
        "input_size": (int(size[0]), int(size[1])),
        "channels": channels,
        "mean": [float(v) for v in (mean if mean is not None else default_mean)],
        "std": [float(v) for v in (std if std is not None else default_std)],
        "embedding_dim": model.embedding_dim,
        "labels_trained": 0,
        "precision": precision,
    }
    try:
        draft = ModelSpec.model_validate({"version": "0-init", **spec_fields})
    except ValueError as exc:
        raise ModelBuildError(f"the model spec is not valid: {exc}") from exc
    # Hash the graph and weights with a placeholder version, then write the
    # final version: a version cannot name the hash of a file that contains it.
    export_onnx(model, draft, out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()[:8]
    spec = draft.model_copy(update={"version": f"0-init-{digest}"})
    export_onnx(model, spec, out)
    check_parity(model, out, spec)
    return spec
