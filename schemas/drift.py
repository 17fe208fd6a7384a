"""Drift: the reference a release carries, and the events on ``winnow.drift`` (key: detector).

A ``DriftReference`` summarizes what a model saw when it was trained: a PCA
projection of its embeddings (whitened, ``k`` dimensions), a sample of
reduced embeddings with their predicted class and entropy (the pool the
scorer's detectors bootstrap from to calibrate), the class mix, and the
entropy distribution. The trainer builds it from the model's own outputs
(``DriftReference.build``); the scorer builds one the same way from the
first frames after a swap when a release carries none.
"""

from datetime import datetime
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

_DIGITS = 5


class DriftEvent(BaseModel):
    """One drift alarm, or a periodic statistic from one detector."""

    kind: Literal["alarm", "statistic"]
    detector: str
    source_id: str | None = Field(default=None, description="null: all sources together")
    statistic: float
    threshold: float
    window: int = Field(description="frames in the detector's window (0: a CUSUM)")
    model_version: str
    time: datetime
    frames: int = Field(default=0, ge=0, description="frames this detector has seen")


class DriftReference(BaseModel):
    """Reference statistics of the data a model was trained on (compact JSON)."""

    origin: Literal["training", "warmup"] = "training"
    frames: int = Field(gt=0, description="frames the statistics summarize")
    embedding_dim: int = Field(gt=0)
    mean: list[float] = Field(description="embedding mean (D)")
    components: list[list[float]] = Field(
        description="k x D projection: (embedding - mean) @ components.T is whitened PCA"
    )
    sample: list[list[float]] = Field(description="reduced embeddings of a random sample (m x k)")
    sample_classes: list[int] = Field(description="predicted class of each sample row")
    sample_entropy: list[float] = Field(description="normalized entropy of each sample row")
    class_mix: list[float] = Field(description="share of each predicted class")
    entropy_mean: float
    entropy_std: float = Field(gt=0)
    entropy_quantiles: list[float] = Field(description="deciles 0, 0.1, ..., 1")
    bandwidth: float = Field(gt=0, description="Gaussian kernel bandwidth (median heuristic)")
    feature_seed: int = Field(description="seeds the random Fourier features of the MMD")
    feature_mean: list[float] = Field(description="mean random Fourier feature over all frames")

    @property
    def k(self) -> int:
        return len(self.components)

    def reduce(self, embeddings: np.ndarray) -> np.ndarray:
        """Projects N x D embeddings onto the whitened k-dim reference space."""
        centered = np.asarray(embeddings, dtype=np.float32) - np.asarray(self.mean, np.float32)
        return centered @ np.asarray(self.components, dtype=np.float32).T

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        probabilities: np.ndarray,
        *,
        k: int = 12,
        sample_size: int = 400,
        features: int = 64,
        seed: int = 0,
        origin: Literal["training", "warmup"] = "training",
    ) -> "DriftReference":
        """Builds the reference from a model's outputs on its reference frames.

        Args:
            embeddings: N x D embeddings.
            probabilities: N x C class probabilities.
            k: PCA dimensions kept (fewer if N or D is smaller).
            sample_size: rows of the stored sample.
            features: random Fourier features of the MMD kernel.
            seed: seeds the sample and the features.
            origin: ``training`` (the trainer) or ``warmup`` (the scorer's first frames).
        """
        x = np.asarray(embeddings, dtype=np.float64)
        p = np.asarray(probabilities, dtype=np.float64)
        if x.ndim != 2 or p.ndim != 2 or len(x) != len(p) or len(x) < 2:
            raise ValueError("need matching N x D embeddings and N x C probabilities, N >= 2")
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        k = max(1, min(k, len(s)))
        scale = s[:k] / np.sqrt(len(x) - 1)
        scale = np.where(scale > 1e-8 * max(1.0, scale[0]), scale, np.inf)
        components = vt[:k] / scale[:, None]  # whitened: unit variance per component
        reduced = (x - mean) @ components.T
        rng = np.random.default_rng(seed)
        rows = rng.choice(len(x), size=min(sample_size, len(x)), replace=False)
        entropy = normalized_entropy(p)
        classes = p.argmax(axis=1)
        mix = np.bincount(classes, minlength=p.shape[1]) / len(p)
        bandwidth = _median_distance(reduced[rows], rng)
        feature_seed = int(rng.integers(2**31))
        freqs, phases = fourier_features(k, features, bandwidth, feature_seed)
        feature_mean = np.cos(reduced @ freqs + phases).mean(axis=0) * np.sqrt(2 / features)
        r = _DIGITS
        return cls(
            origin=origin,
            frames=len(x),
            embedding_dim=x.shape[1],
            mean=np.round(mean, r).tolist(),
            components=np.round(components, r + 2).tolist(),
            sample=np.round(reduced[rows], r - 1).tolist(),
            sample_classes=classes[rows].tolist(),
            sample_entropy=np.round(entropy[rows], r).tolist(),
            class_mix=np.round(mix, r).tolist(),
            entropy_mean=float(entropy.mean()),
            entropy_std=float(max(entropy.std(), 1e-4)),
            entropy_quantiles=np.round(np.quantile(entropy, np.linspace(0, 1, 11)), r).tolist(),
            bandwidth=bandwidth,
            feature_seed=feature_seed,
            feature_mean=np.round(feature_mean, r + 1).tolist(),
        )


def normalized_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy of each row divided by log(C): 0 (certain) to 1 (uniform)."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    return np.asarray(-(p * np.log(p)).sum(axis=1) / np.log(p.shape[1]))


def fourier_features(
    k: int, features: int, bandwidth: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random Fourier features of a Gaussian kernel (Rahimi and Recht, NIPS 2007).

    ``sqrt(2/F) cos(z @ W + b)`` with ``W ~ N(0, 1/bandwidth^2)`` and
    ``b ~ U(0, 2 pi)``: their inner product approximates exp(-|z-z'|^2 / 2 bw^2).
    """
    rng = np.random.default_rng(seed)
    freqs = rng.normal(0.0, 1.0 / bandwidth, size=(k, features)).astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, size=features).astype(np.float32)
    return freqs, phases


def _median_distance(z: np.ndarray, rng: np.random.Generator) -> float:
    rows = z[rng.choice(len(z), size=min(len(z), 200), replace=False)]
    d = np.sqrt(((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1))
    upper = d[np.triu_indices(len(rows), 1)]
    return float(max(np.median(upper) if len(upper) else 1.0, 1e-3))
