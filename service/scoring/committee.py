"""Bayesian and committee utilities: BALD, vote entropy, average KL.

All take ``samples`` of shape (T, N, C): T stochastic passes (MC dropout) or
T committee members (the last model releases), N frames, C classes. With the
consensus ``p̄ = mean_t p_t``:

- BALD (Houlsby et al. 2011; Gal, Islam and Ghahramani, "Deep Bayesian active
  learning with image data", ICML 2017): the mutual information between the
  label and the weights, ``I = H[p̄] - mean_t H[p_t]``.
- vote entropy (Dagan and Engelson 1995; Settles 2009): with ``V(k)`` the
  members voting for class ``k``, ``VE = -Σ_k V(k)/T log(V(k)/T)``.
- average KL divergence (McCallum and Nigam 1998):
  ``KL̄ = mean_t Σ_k p_t^k log(p_t^k / p̄^k)``. With equal weights it equals
  BALD's mutual information; they differ in the committee they are given.

Each is divided by its largest value, ``log min(T, C)``, into [0, 1].

MC dropout here is exact for ``WinnowNet``: its only dropout sits between the
embedding and the linear head, so T passes with dropout on are T masks on the
embedding followed by the head (:func:`mc_dropout_probabilities`); the head's
weights are read from the model's metadata (:func:`head_from_metadata`, written by
the trainer's export) or from the ONNX graph (:func:`head_from_onnx`), so no second
model needs to be exported or run.
"""

import json
import math
from collections import deque
from collections.abc import Mapping
from typing import get_args

import numpy as np

from schemas.api import CommitteeUtilityName
from schemas.model_spec import HEAD_KEY

COMMITTEE_UTILITIES: tuple[CommitteeUtilityName, ...] = get_args(CommitteeUtilityName)
"""The utility names that need a committee (MC-dropout passes or the last releases)."""

Head = tuple[np.ndarray, np.ndarray, float]
"""A linear head: weight (C, D), bias (C,) and the dropout rate before it."""


def _check(samples: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(samples, dtype=np.float64), 0.0, 1.0)
    if p.ndim != 3:
        raise ValueError(f"expected samples (T, N, C), got {p.shape}")
    return p


def _h(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.where(p > 0.0, p, 1.0))).sum(axis=-1)


def _scale(t: int, c: int) -> float:
    return math.log(min(t, c)) if min(t, c) > 1 else 0.0


def bald(samples: np.ndarray) -> np.ndarray:
    """Normalized mutual information ``(H[p̄] - mean_t H[p_t]) / log min(T, C)``, shape (N,)."""
    p = _check(samples)
    scale = _scale(p.shape[0], p.shape[2])
    if scale == 0.0:
        return np.zeros(p.shape[1])
    info = _h(p.mean(axis=0)) - _h(p).mean(axis=0)
    return np.clip(info / scale, 0.0, 1.0)


def vote_entropy(samples: np.ndarray) -> np.ndarray:
    """Normalized vote entropy ``-Σ_k V(k)/T log(V(k)/T) / log min(T, C)``, shape (N,)."""
    p = _check(samples)
    t, n, c = p.shape
    scale = _scale(t, c)
    if scale == 0.0:
        return np.zeros(n)
    votes = p.argmax(axis=2)  # (T, N)
    counts = np.zeros((n, c))
    np.add.at(counts, (np.arange(n)[None, :].repeat(t, 0), votes), 1.0)
    return np.clip(_h(counts / t) / scale, 0.0, 1.0)


def average_kl(samples: np.ndarray) -> np.ndarray:
    """Normalized mean KL of each member to the consensus, shape (N,)."""
    p = _check(samples)
    scale = _scale(p.shape[0], p.shape[2])
    if scale == 0.0:
        return np.zeros(p.shape[1])
    consensus = np.clip(p.mean(axis=0), 1e-12, 1.0)
    ratio = np.where(p > 0.0, p / consensus, 1.0)
    kl = (p * np.log(ratio)).sum(axis=2).mean(axis=0)
    return np.clip(kl / scale, 0.0, 1.0)


def committee_utilities(samples: np.ndarray) -> dict[str, np.ndarray]:
    """Every committee utility by name."""
    return {
        "bald": bald(samples),
        "vote_entropy": vote_entropy(samples),
        "average_kl": average_kl(samples),
    }


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def mc_dropout_probabilities(
    embeddings: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    rate: float,
    passes: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """T passes of dropout on the embedding, then the linear head: (T, N, C) probabilities.

    Args:
        embeddings: (N, D) as the model outputs them.
        weight: (C, D) head weight; bias: (C,).
        rate: the dropout probability the model was trained with.
        passes: T.
        rng: draws the masks.
    """
    keep = 1.0 - rate
    masks = rng.random((passes, *embeddings.shape)) < keep
    dropped = np.where(masks, embeddings[None] / keep, 0.0)
    return _softmax(dropped @ weight.T + bias)


def head_from_onnx(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The (C, D) weight and (C,) bias of the linear layer that feeds the softmax, if found."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        head = producers.get(node.input[0])
        if head is None or head.op_type != "Gemm" or len(head.input) < 3:
            return None
        weight, bias = inits.get(head.input[1]), inits.get(head.input[2])
        if weight is None or bias is None:
            return None
        trans_b = next((a.i for a in head.attribute if a.name == "transB"), 0)
        return (weight if trans_b else weight.T).astype(np.float64), bias.astype(np.float64)
    return None


def head_from_metadata(metadata: Mapping[str, str]) -> Head | None:
    """The head ``(weight (C, D), bias (C,), dropout rate)`` from a model's ONNX metadata.

    The trainer writes it under ``HEAD_KEY`` next to the spec; a model without it (an
    older export, or another architecture) gives None, and the scorer falls back to
    the release committee.
    """
    text = metadata.get(HEAD_KEY)
    if not text:
        return None
    raw = json.loads(text)
    return (
        np.asarray(raw["weight"], dtype=np.float64),
        np.asarray(raw["bias"], dtype=np.float64),
        float(raw["dropout"]),
    )


class ReleaseCommittee:
    """The last ``k`` models the scorer served; ``samples`` runs each on the same inputs.

    The scoring engine adds each model the scorer swaps in. With fewer than two
    members the committee utilities are 0 (no disagreement to measure).
    """

    def __init__(self, k: int = 3) -> None:
        self._members: deque[object] = deque(maxlen=max(1, k))

    def add(self, model: object) -> None:
        self._members.append(model)

    def clear(self) -> None:
        """Forgets every member (and so lets their sessions go)."""
        self._members.clear()

    def __len__(self) -> int:
        return len(self._members)

    def samples(self, inputs: np.ndarray, current: np.ndarray) -> np.ndarray:
        """(T, N, C): ``current`` (the serving model's output) plus each earlier member's."""
        out = [current]
        members = list(self._members)[:-1]  # the last one added is the serving model
        for member in members:
            probabilities, _ = member.run(inputs)  # type: ignore[attr-defined]
            if probabilities.shape == current.shape:
                out.append(probabilities)
        return np.stack(out)
