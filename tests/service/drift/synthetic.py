"""Synthetic model outputs for the drift detectors: class clusters and streams around them."""

import numpy as np

CLASSES, DIM = 5, 24


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
    centres = np.random.default_rng(99).normal(0, 2.0, size=(CLASSES, DIM))
    embeddings = centres[labels] + rng.normal(size=(n, DIM)) + shift
    logits = rng.normal(size=(n, CLASSES))
    logits[np.arange(n), labels] += sharpness
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return embeddings.astype(np.float32), probabilities.astype(np.float32)
