"""Learning from each label at once: the classification head refit on frozen embeddings.

Between backbone rounds, the trainer keeps the backbone as it is and fits only
the last linear layer, a multinomial logistic regression on the embeddings
the backbone already computes. The problem is convex, so full-batch L-BFGS
finds its one optimum in well under a second for thousands of labels; the
embeddings are cached per frame and backbone version, so a refit after a few
new labels costs those few forward passes, not a pass over every label.

The fit is pulled towards the head the model has (an L2 penalty on the
distance, not on the weights), so the head that a backbone round trained with
augmentation and replay is a prior that new labels move, not something a
handful of them throw away. ``refit_head`` is the plain entry point (a model
and samples in, a model with a new head out); the trainer's loop uses
:func:`fit_head` on cached embeddings (:class:`EmbeddingCache`).
"""

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from schemas.model_spec import ModelSpec
from trainer.architectures import WinnowNet
from trainer.errors import SampleError
from trainer.finetune import class_weights
from trainer.forward import EVAL_BATCH, forward_eval, forward_samples
from trainer.samples import Sample, decode_inputs, inputs_of

log = logging.getLogger(__name__)

DEFAULT_L2 = 1.0
"""Strength of the pull towards the current head, per label (scikit-learn's ``C = 1``)."""

EMBED_BATCH = 256
"""Frames the embedding cache reads and decodes at a time (embedded ``EVAL_BATCH`` at a
time)."""


@dataclass(frozen=True)
class LinearHead:
    """A classification head: ``logits = embedding @ weight.T + bias``.

    Attributes:
        weight: (C, D) float32.
        bias: (C,) float32.
    """

    weight: np.ndarray
    bias: np.ndarray

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, C) logits of (N, D) embeddings."""
        return np.asarray(embeddings, np.float32) @ self.weight.T + self.bias

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """(N,) class indices; empty for no embeddings."""
        if len(embeddings) == 0:
            return np.zeros(0, dtype=np.int64)
        return self.logits(embeddings).argmax(axis=1)


def head_of(model: WinnowNet) -> LinearHead:
    """The model's current head, copied out as float32 arrays."""
    return LinearHead(
        model.head.weight.detach().cpu().float().numpy().copy(),
        model.head.bias.detach().cpu().float().numpy().copy(),
    )


def with_head(model: WinnowNet, head: LinearHead) -> WinnowNet:
    """A copy of ``model`` whose head is ``head``; ``model`` itself is left as it is.

    Raises:
        ValueError: the head's shape is not the model's.
    """
    if head.weight.shape != tuple(model.head.weight.shape) or head.bias.shape != tuple(
        model.head.bias.shape
    ):
        raise ValueError(
            f"a head of shape {head.weight.shape} does not fit a model whose head is "
            f"{tuple(model.head.weight.shape)}"
        )
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.head.weight.copy_(torch.from_numpy(head.weight))
        out.head.bias.copy_(torch.from_numpy(head.bias))
    out.eval()
    return out


def embed(
    model: WinnowNet, inputs: np.ndarray, device: torch.device, batch_size: int = EVAL_BATCH
) -> np.ndarray:
    """(N, D) float32 embeddings of preprocessed inputs, the backbone in eval mode.

    The backbone is only read: its mode is restored, so this may run while
    another thread trains a copy of the model.
    """
    outputs = forward_eval(model.backbone, inputs, device, batch_size)
    if not outputs:
        return np.zeros((0, model.embedding_dim), dtype=np.float32)
    return outputs[0]


def fit_head(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    prior: LinearHead | None = None,
    l2: float = DEFAULT_L2,
    max_iter: int = 500,
    sample_weight: np.ndarray | None = None,
) -> LinearHead:
    """Multinomial logistic regression on frozen embeddings, pulled towards ``prior``.

    Minimizes ``mean cross-entropy + l2 / (2 n) * ||W - W_prior||^2`` (the mean and
    ``n`` over ``sample_weight`` when given) over the weight and bias with L-BFGS
    (Nocedal and Wright, *Numerical Optimization*, algorithm 7.4, with a
    backtracking Armijo line search), on the embeddings
    centred and divided by one global scale (folded back into the result). The
    objective is strictly convex in ``W``, so the result depends on the data
    and the prior alone. It runs in numpy: a few hundred tiny steps that torch
    would hand to its thread pool one by one, which costs seconds on a busy
    machine instead of milliseconds.

    Args:
        embeddings: (N, D) embeddings of the labeled frames.
        labels: (N,) class indices in ``[0, num_classes)``.
        num_classes: C; classes without a label keep what the prior says.
        prior: the head to stay close to; None: zeros (plain L2).
        l2: how strongly, per label (``1 / C`` in scikit-learn's terms).
        max_iter: L-BFGS iterations at most.
        sample_weight: (N,) positive frequency weights (a sample of weight 2 counts as two
            samples: the mean and ``n`` are over the weights); None: 1 each.

    Returns:
        The fitted head, float32.

    Raises:
        ValueError: no samples, mismatched shapes or a label out of range.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or len(x) == 0 or len(x) != len(y):
        raise ValueError(f"need (N, D) embeddings and N labels, got {x.shape}, {len(y)}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes})")
    if l2 <= 0:
        raise ValueError(f"l2 must be positive, got {l2}")
    n, dim = x.shape
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or w.min() <= 0:
        raise ValueError(f"sample weights must be N = {n} positive numbers")
    total = float(w.sum())
    w0 = np.zeros((num_classes, dim)) if prior is None else np.asarray(prior.weight, np.float64)
    b0 = np.zeros(num_classes) if prior is None else np.asarray(prior.bias, np.float64)
    if w0.shape != (num_classes, dim):
        raise ValueError(f"the prior head is {w0.shape}, not {(num_classes, dim)}")
    # Centred and scaled by one global factor, so the penalty means the same whatever the
    # backbone's output scale (a random backbone's embeddings are tiny); one factor, not
    # one per dimension, so that near-constant dimensions are not blown up into noise.
    centre = w @ x / total
    scale = float(np.sqrt(w @ ((x - centre) ** 2).mean(axis=1) / total)) or 1.0
    z = (x - centre) / scale
    z_w0 = w0 * scale
    onehot = np.eye(num_classes)[y]
    penalty = l2 / (2 * total)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        weight, bias = theta[:-num_classes].reshape(num_classes, dim), theta[-num_classes:]
        logits = z @ weight.T + bias
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        diff = weight - z_w0
        loss = -float(w @ (onehot * log_p).sum(axis=1)) / total + penalty * float((diff**2).sum())
        residual = (np.exp(log_p) - onehot) * (w / total)[:, None]
        grad_w = residual.T @ z + 2 * penalty * diff
        return loss, np.concatenate([grad_w.ravel(), residual.sum(axis=0)])

    start = np.concatenate([z_w0.ravel(), b0 + w0 @ centre])
    theta = _lbfgs(objective, start, max_iter)
    weight = theta[:-num_classes].reshape(num_classes, dim) / scale
    bias = theta[-num_classes:] - weight @ centre  # z @ W.T + b == x @ (W / s).T + b - W.c / s
    return LinearHead(weight.astype(np.float32), bias.astype(np.float32))


def _lbfgs(
    objective: Callable[[np.ndarray], tuple[float, np.ndarray]],
    start: np.ndarray,
    max_iter: int,
    memory: int = 10,
    tolerance: float = 1e-6,
) -> np.ndarray:
    """Minimizes a smooth convex function from ``start`` (L-BFGS, Armijo backtracking)."""
    theta = start.copy()
    loss, grad = objective(theta)
    steps: list[tuple[np.ndarray, np.ndarray, float]] = []  # (s, y, 1 / y.s), newest last
    for _ in range(max_iter):
        if float(np.abs(grad).max()) < tolerance:
            break
        direction = -grad
        alphas = []
        for s, y, rho in reversed(steps):  # the two-loop recursion
            alpha = rho * float(s @ direction)
            direction = direction - alpha * y
            alphas.append(alpha)
        if steps:
            s, y, _ = steps[-1]
            direction *= float(s @ y) / float(y @ y)
        for (s, y, rho), alpha in zip(steps, reversed(alphas), strict=True):
            direction = direction + s * (alpha - rho * float(y @ direction))
        slope = float(grad @ direction)
        if slope >= 0:  # not a descent direction: start the memory over
            steps, direction, slope = [], -grad, -float(grad @ grad)
        step = 1.0 if steps else min(1.0, 1.0 / max(float(np.abs(grad).sum()), 1e-12))
        while True:
            candidate = theta + step * direction
            new_loss, new_grad = objective(candidate)
            if new_loss <= loss + 1e-4 * step * slope or step < 1e-12:
                break
            step *= 0.5
        s, y = candidate - theta, new_grad - grad
        if float(y @ s) > 1e-12:
            steps = [*steps[-(memory - 1) :], (s, y, 1.0 / float(y @ s))]
        converged = abs(loss - new_loss) <= 1e-12 * max(1.0, abs(loss))
        theta, loss, grad = candidate, new_loss, new_grad
        if converged:
            break
    return theta


def refit_head(
    model: WinnowNet,
    samples: Sequence[Sample],
    device: torch.device | None = None,
    *,
    l2: float = DEFAULT_L2,
    class_balance: float = 0.0,
) -> WinnowNet:
    """A copy of ``model`` whose head is refit on ``samples`` with the backbone frozen.

    The plain entry point, for a benchmark between rounds: embeds every sample
    (no cache), fits with the current head as the prior (:func:`fit_head`) and
    returns a new model; ``model`` is left as it is.

    Args:
        model: a :class:`~trainer.architectures.WinnowNet`.
        samples: the labeled samples to learn from (the holdout left out).
        device: where the backbone runs; the CPU if None.
        l2: the pull towards the current head, per label.
        class_balance: class weights of the fit, as a round's
            (``trainer.finetune.class_weights``); 0: none.

    Raises:
        ValueError: no samples.
    """
    if not samples:
        raise ValueError("cannot refit a head on zero samples")
    (embeddings,), labels = forward_samples(model.backbone, samples, device or torch.device("cpu"))
    weights = class_weights(labels, model.num_classes, class_balance)
    head = fit_head(
        embeddings,
        labels,
        model.num_classes,
        prior=head_of(model),
        l2=l2,
        sample_weight=None if weights is None else weights[labels],
    )
    return with_head(model, head)


class EmbeddingCache:
    """Embeddings by frame id for one backbone version, so a refit embeds only new frames.

    A frame's image never changes, so its embedding changes only with the
    backbone; the cache empties when asked for another backbone version. Frames
    whose image does not decode are remembered as such.
    """

    def __init__(self) -> None:
        self.version: str | None = None
        self._vectors: dict[str, np.ndarray | None] = {}
        self.embedded = 0
        """Forward passes made since the cache was built, for tests and logs."""

    def under(self, backbone_version: str) -> "EmbeddingCache":
        """This cache, now keyed to ``backbone_version``: a round's candidate embeds before
        its release has a version, and its embeddings are that release's."""
        self.version = backbone_version
        return self

    def embeddings(
        self,
        model: WinnowNet,
        spec: ModelSpec,
        backbone_version: str,
        frame_ids: Sequence[str],
        read_images: Callable[[list[str]], Mapping[str, bytes]],
        device: torch.device,
        decoded: Mapping[str, Sample] | None = None,
    ) -> dict[str, np.ndarray]:
        """The embeddings of ``frame_ids`` under ``model``'s backbone (those that decode).

        Args:
            model: the model whose backbone embeds; its version is ``backbone_version``.
            spec: the preprocessing of new frames.
            backbone_version: the full release the backbone belongs to.
            frame_ids: the frames wanted.
            read_images: the encoded images of the given frame ids (called with the
                frames not embedded before, ``EMBED_BATCH`` at a time).
            device: where the backbone runs.
            decoded: samples already decoded, by frame id: their images are not read.
        """
        if backbone_version != self.version:
            self.version, self._vectors = backbone_version, {}
        missing = [f for f in dict.fromkeys(frame_ids) if f not in self._vectors]
        if missing:
            self._embed(model, spec, missing, read_images, device, decoded or {})
        return {f: v for f in frame_ids if (v := self._vectors.get(f)) is not None}

    def _embed(
        self,
        model: WinnowNet,
        spec: ModelSpec,
        frame_ids: list[str],
        read_images: Callable[[list[str]], Mapping[str, bytes]],
        device: torch.device,
        known: Mapping[str, Sample],
    ) -> None:
        # a batch at a time: after a new backbone every label is embedded again, and all
        # their inputs at once would grow the trainer's memory with each label
        for start in range(0, len(frame_ids), EMBED_BATCH):
            chunk = frame_ids[start : start + EMBED_BATCH]
            held = [known[f] for f in chunk if f in known]
            decoded = dict(zip((s.frame_id for s in held), inputs_of(held), strict=True))
            unread = [f for f in chunk if f not in known]
            images = read_images(unread) if unread else {}
            for frame_id in unread:
                image = images.get(frame_id)
                if image is None:
                    continue  # not stored (yet): asked again next time
                try:
                    decoded[frame_id] = decode_inputs(frame_id, image, spec)
                except SampleError as error:
                    log.warning("skipping frame %s: %s", frame_id, error)
                    self._vectors[frame_id] = None
            if not decoded:
                continue
            vectors = embed(model, np.stack(list(decoded.values())), device)
            self._vectors.update(zip(decoded, vectors, strict=True))
            self.embedded += len(decoded)
