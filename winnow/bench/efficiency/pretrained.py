"""``--pretrained``: a frozen pretrained backbone (EfficientNet-Lite0), features cached once.

For camera-sized frames the small CNN trained from scratch is the wrong
learner: users start from a pretrained backbone, as AIFT does. Passing every
frame of every strategy and seed through EfficientNet-Lite0 at 224 x 224 on
two CPU cores would cost hours, so the backbone is frozen and run once per
frame (stream and test split) before the runs start; the learner is then the
trainer's fine-tuning round on the linear head over those features. This
approximates the trainer, which also fine-tunes the backbone; it keeps the
run affordable. AIFT's utilities need views of the image through the backbone
and are refused here.

Cost: one forward pass per frame (about 0.4 GFLOPs at 224 x 224), logged and
written to the JSON as ``feature_seconds``; afterwards a run costs about as
much as one on digits.
"""

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np

from winnow.bench.efficiency.errors import BenchConfigError
from winnow.bench.efficiency.stream import StreamData

log = logging.getLogger(__name__)

PRETRAINED_ARCH = "efficientnet_lite0"


class PretrainedUnavailable(BenchConfigError):
    """The trainer cannot build the pretrained architecture (yet)."""


def check_available() -> None:
    """Raises PretrainedUnavailable unless the trainer knows ``efficientnet_lite0``."""
    from trainer.architectures import ARCHITECTURES

    if PRETRAINED_ARCH not in ARCHITECTURES:
        raise PretrainedUnavailable(
            f"--pretrained: the trainer has no '{PRETRAINED_ARCH}' architecture yet "
            f"(trainer.architectures knows {', '.join(ARCHITECTURES)})"
        )


def pretrained_model(n_classes: int, channels: int) -> Any:
    """The trainer's EfficientNet-Lite0 with its pretrained weights."""
    from trainer.architectures import build_model

    check_available()
    return build_model(PRETRAINED_ARCH, n_classes, channels, pretrained=True)


def head_model(dim: int, n_classes: int, dropout: float = 0.2) -> Any:
    """A ``WinnowNet`` over cached features: an identity backbone, the dropout and the head."""
    from torch import nn

    from trainer.architectures import WinnowNet

    return WinnowNet(nn.Identity(), dim, n_classes, dropout)


def embed(backbone: Any, inputs: np.ndarray, batch: int = 64) -> np.ndarray:
    """The backbone's pooled features of every input, in eval mode."""
    import torch

    backbone.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch):
            x = torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch]))
            out.append(backbone(x).float().numpy())
    return np.concatenate(out)


def cache_features(data: StreamData, workers: int, backbone: Any = None) -> StreamData:
    """The stream with every frame replaced by its frozen-backbone features.

    Args:
        data: the preprocessed stream (images at the backbone's input size).
        workers: torch threads for the extraction.
        backbone: the feature extractor (default: the pretrained EfficientNet-Lite0's).
    """
    import torch

    if backbone is None:
        backbone = pretrained_model(len(data.classes), data.channels).backbone
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, workers))
    started = time.perf_counter()
    try:
        train, test = embed(backbone, data.inputs), embed(backbone, data.test_inputs)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - started
    log.info("pretrained features frames=%d seconds=%.1f", len(train) + len(test), seconds)
    info = {**data.info, "pretrained": PRETRAINED_ARCH, "feature_seconds": round(seconds, 1)}
    return replace(data, inputs=train, test_inputs=test, features=True, info=info)
