"""Synthetic model outputs for the drift detectors: class clusters and streams around them."""

import json

import numpy as np

from schemas.model_spec import HEAD_KEY

CLASSES, DIM = 5, 24
CENTRES = np.random.default_rng(99).normal(0, 2.0, size=(CLASSES, DIM))


def outputs(
    n: int,
    rng: np.random.Generator,
    *,
    shift: float = 0.0,
    mix: np.ndarray | None = None,
    sharpness: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (class clusters) and probabilities; ``shift`` moves every embedding,
    ``mix`` changes the class mix, a lower ``sharpness`` makes predictions less certain."""
    mix = np.full(CLASSES, 1 / CLASSES) if mix is None else mix
    labels = rng.choice(CLASSES, size=n, p=mix)
    embeddings = CENTRES[labels] + rng.normal(size=(n, DIM)) + shift
    logits = rng.normal(size=(n, CLASSES))
    logits[np.arange(n), labels] += sharpness
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return embeddings.astype(np.float32), probabilities.astype(np.float32)


def linear_head(
    seed: int, scale: float = 0.05, favour: int | None = None, by: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """A linear head (C x DIM weight, C bias) near the nearest-centre rule, perturbed by
    ``seed``; ``favour`` adds ``by`` to one class's logit (the head predicts it more)."""
    rng = np.random.default_rng(seed)
    weight = scale * (CENTRES + rng.normal(0, 0.3, size=CENTRES.shape))
    bias = -0.5 * scale * (CENTRES**2).sum(axis=1)
    if favour is not None:
        bias[favour] += by
    return weight, bias


def head_metadata(weight: np.ndarray, bias: np.ndarray) -> dict[str, str]:
    """ONNX metadata with the head, as the trainer's export writes it."""
    head = {"weight": weight.tolist(), "bias": bias.tolist(), "dropout": 0.0}
    return {HEAD_KEY: json.dumps(head)}
