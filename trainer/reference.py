"""Drift reference statistics of a model's training data, shipped in each release.

The scorer's drift detectors compare the live stream with what the model saw
when it was trained (``schemas.drift.DriftReference``). The statistics are
the model's own outputs on its samples: embeddings (PCA-reduced, whitened),
predicted class mix and entropy. Samples the model trained on look more
certain to it than new frames do, so the holdout is used when it is large
enough; labels chosen by active learning are also more uncertain than the
stream on average, which is why the scorer can warm up on live frames instead
(``WINNOW_DRIFT_USE_RELEASE_REFERENCE=false``).
"""

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from schemas.drift import DriftReference
from trainer.forward import EVAL_BATCH, forward_eval, forward_samples
from trainer.samples import Sample

MIN_HOLDOUT = 200


def model_outputs(
    model: nn.Module, inputs: np.ndarray, device: torch.device, batch_size: int = EVAL_BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities N x C, embeddings N x D)`` in eval mode; restores the model's mode."""
    model.to(device)
    probabilities, embeddings = forward_eval(model, inputs, device, batch_size)
    return probabilities, embeddings


def reference_for(
    model: nn.Module,
    train: Sequence[Sample],
    holdout: Sequence[Sample],
    device: torch.device,
    seed: int = 0,
) -> DriftReference | None:
    """The reference of ``model``: on the holdout if it has ``MIN_HOLDOUT`` samples, else on
    every sample; None with fewer than 2 samples."""
    samples = list(holdout) if len(holdout) >= MIN_HOLDOUT else [*train, *holdout]
    if len(samples) < 2:
        return None
    model.to(device)
    (probabilities, embeddings), _ = forward_samples(model, samples, device)
    return DriftReference.build(embeddings, probabilities, seed=seed)
