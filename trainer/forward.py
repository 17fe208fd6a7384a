"""Forward passes over many inputs in eval mode, in batches of a few fixed sizes.

CPU torch (oneDNN) compiles and caches kernels per input shape, up to 1,024 of
them. A trainer that embeds "the frames new since the last refit" or
evaluates "the holdout as it is now" would ask for a new batch size nearly
every time, and its memory would grow with each one until that cache is full
(tens of MB over an hour of labels). Each batch here is padded to the next
power of two (at most ``batch_size``), so a model sees at most nine batch
sizes; in eval mode a sample's output does not depend on the others in its
batch, and the padding rows are dropped.
"""

import numpy as np
import torch
from torch import nn


def bucket(n: int, batch_size: int) -> int:
    """The padded size of a batch of ``n``: the next power of two, at most ``batch_size``."""
    return min(batch_size, 1 << max(n - 1, 0).bit_length())


def forward_eval(
    module: nn.Module, inputs: np.ndarray, device: torch.device, batch_size: int = 256
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
