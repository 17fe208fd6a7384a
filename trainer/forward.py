"""Forward passes over many inputs in eval mode, in batches of a few fixed sizes.

CPU torch (oneDNN) compiles and caches kernels per input shape, up to 1,024 of
them. A trainer that embeds "the frames new since the last refit" or
evaluates "the holdout as it is now" would ask for a new batch size nearly
every time, and its memory would grow with each one until that cache is full
(tens of MB over an hour of labels). Each batch here is padded to the next
power of two (at most ``batch_size``, by default :data:`EVAL_BATCH`), so a model sees
at most seven batch sizes; in eval mode a sample's output does not depend on the others in its
batch, and the padding rows are dropped.

Over labeled samples (:func:`forward_samples`) the inputs are stacked a batch at a
time: a round scores up to 8,192 replay candidates, the holdout and, for a new
backbone's head, every label, whose float32 inputs at once grew the trainer's memory
with each label (12 KB a label at 3 x 32 x 32, 602 KB at 3 x 224 x 224).
"""

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from trainer.samples import Sample, stack

EVAL_BATCH = 64
"""Rows a forward pass in eval mode runs at once. A pass holds its batch's activations at
its peak, and the heap of the thread that ran it keeps room for the largest peak: the
small CNN at 16x16 held 24 MB more at 256 rows than between passes, 10 MB at 64 and 6 MB
at 32, at the same speed (600 frames, one thread, ``RssAnon`` read every 2 ms). In the
60-minute soak the trainer's round thread's heap grew by 20 MB in one step while it
evaluated 256 rows at a time; a later 60-minute soak at 64 rows grew about as much over the
hour (docs/benchmarks.md, "Soak"), so that step is not these passes alone. 64 keeps the
small CNN's batches as fast, and bounds a camera model's: ResNet-18's first convolution
at 224 alone outputs 64 x 112 x 112 float32 values, 3.2 MB a frame (arithmetic, not
measured)."""


def bucket(n: int, batch_size: int) -> int:
    """The padded size of a batch of ``n``: the next power of two, at most ``batch_size``."""
    return min(batch_size, 1 << max(n - 1, 0).bit_length())


def forward_eval(
    module: nn.Module, inputs: np.ndarray, device: torch.device, batch_size: int = EVAL_BATCH
) -> list[np.ndarray]:
    """Each of ``module``'s outputs on ``inputs`` (N x ...) as float32 arrays of N rows.

    ``module`` runs in eval mode under ``torch.inference_mode`` on ``device``
    (where it already is); its mode is restored afterwards, so this may run
    while another thread trains a copy of it. A module with one output gives a
    list of one array; no inputs give an empty list.
    """
    was_training = module.training
    module.eval()
    parts: list[list[np.ndarray]] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(inputs), batch_size):
                chunk = inputs[start : start + batch_size]
                padded = np.zeros((bucket(len(chunk), batch_size), *chunk.shape[1:]), chunk.dtype)
                padded[: len(chunk)] = chunk
                outputs = module(torch.from_numpy(padded).to(device))
                if isinstance(outputs, torch.Tensor):
                    outputs = (outputs,)
                parts.append([o[: len(chunk)].float().cpu().numpy() for o in outputs])
    finally:
        module.train(was_training)
    return [np.concatenate(column) for column in zip(*parts, strict=True)]


def forward_samples(
    module: nn.Module, samples: Sequence[Sample], device: torch.device, batch_size: int = EVAL_BATCH
) -> tuple[list[np.ndarray], np.ndarray]:
    """:func:`forward_eval` of ``samples``, stacked ``batch_size`` at a time (the same
    batches, so the same outputs), with their labels (N,)."""
    labels = np.fromiter((s.label for s in samples), dtype=np.int64, count=len(samples))
    parts = []
    for start in range(0, len(samples), batch_size):
        inputs, _ = stack(samples[start : start + batch_size])
        parts.append(forward_eval(module, inputs, device, batch_size))
    return [np.concatenate(column) for column in zip(*parts, strict=True)], labels


def predicted_classes(
    model: nn.Module, samples: Sequence[Sample], device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """``model``'s top-1 class of each sample and the sample's label, both (N,) int64."""
    model.to(device)
    outputs, labels = forward_samples(model, samples, device)
    if not outputs:
        return np.zeros(0, dtype=np.int64), labels
    return outputs[0].argmax(axis=1), labels
