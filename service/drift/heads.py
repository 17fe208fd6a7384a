"""The linear head in numpy: what the drift monitor needs to follow a head-only swap.

Every Winnow model computes ``probabilities = softmax(embedding @ weight.T + bias)``
and writes its head under ``HEAD_KEY`` in its ONNX metadata. A head-only
release keeps the backbone, so the embeddings the monitor already holds (those
of its reference frames, those of each batch) give the new head's outputs
without running the model: a matrix product per frame.
"""

from collections.abc import Mapping

import numpy as np

from schemas.drift import DriftReference, normalized_entropy
from service.scoring.committee import head_from_metadata

HEAD_DETECTORS = frozenset({"prediction", "uncertainty"})
"""The detectors that read the head's outputs (class and entropy); ``embedding`` does not."""

_DIGITS = 5  # as DriftReference.build rounds
_SAMPLE_SIZE = 400  # DriftReference.build's default sample size


class LinearHead:
    """A model's classification head: ``weight`` (C x D) and ``bias`` (C)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        self.weight = np.asarray(weight, dtype=np.float64)
        self.bias = np.asarray(bias, dtype=np.float64)

    @classmethod
    def of(cls, model: object) -> "LinearHead | None":
        """The head in ``model``'s ONNX metadata; None for a model that does not write one."""
        metadata = getattr(model, "metadata", None)
        if not isinstance(metadata, Mapping):
            return None
        try:
            found = head_from_metadata(metadata)
        except (ValueError, KeyError, TypeError):  # malformed JSON or fields
            return None
        if found is None:
            return None
        weight, bias, _ = found
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            return None
        return cls(weight, bias)

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """``softmax(embeddings @ weight.T + bias)`` (N x C, float32 like the model's)."""
        logits = np.asarray(embeddings, dtype=np.float64) @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        out = np.exp(logits)
        out /= out.sum(axis=1, keepdims=True)
        return out.astype(np.float32)


def with_head(
    reference: DriftReference, embeddings: np.ndarray, head: LinearHead, seed: int
) -> DriftReference:
    """``reference`` with the class and entropy statistics of ``head`` on its frames.

    ``reference`` must have been built (``DriftReference.build(embeddings, ...,
    seed=seed)``) from these ``embeddings``: its embedding statistics stay as
    they are, and the result is what ``build`` would give with the new head's
    probabilities, without its PCA (the costly part).
    """
    embeddings = np.asarray(embeddings)
    if len(embeddings) != reference.frames or embeddings.shape[1] != reference.embedding_dim:
        raise ValueError("the embeddings are not those the reference was built from")
    p = head.probabilities(embeddings).astype(np.float64)
    if p.shape[1] != len(reference.class_mix):
        raise ValueError(
            f"the head has {p.shape[1]} classes, the reference {len(reference.class_mix)}"
        )
    # the rows DriftReference.build samples: its generator's first draw
    rows = np.random.default_rng(seed).choice(len(p), size=min(_SAMPLE_SIZE, len(p)), replace=False)
    entropy = normalized_entropy(p)
    classes = p.argmax(axis=1)
    mix = np.bincount(classes, minlength=p.shape[1]) / len(p)
    r = _DIGITS
    return reference.model_copy(
        update={
            "sample_classes": classes[rows].tolist(),
            "sample_entropy": np.round(entropy[rows], r).tolist(),
            "class_mix": np.round(mix, r).tolist(),
            "entropy_mean": float(entropy.mean()),
            "entropy_std": float(max(entropy.std(), 1e-4)),
            "entropy_quantiles": np.round(np.quantile(entropy, np.linspace(0, 1, 11)), r).tolist(),
        }
    )
