"""AIFT patch scores: uncertainty over augmented views of one frame.

Zhou, Shin, Zhang, Gurudu, Gotway and Liang, "Fine-tuning convolutional neural
networks for biomedical image analysis: actively and incrementally", CVPR 2017
(AIFT). Each frame is seen as ``m`` views ("patches": shifts, crops at other
scales, flips, rotations) that the model scores in the same batch; the frame is
worth labeling when the model is unsure of each view (entropy) or when the
views disagree with each other (diversity).

Written for ``C`` classes. With ``p_i`` the probabilities of view ``i``:

- majority selection (the paper's Sec. 3.2, for robustness to noisy views):
  the dominant class is ``ĉ = argmax_k mean_i p_i^k``; only the
  ``⌈α m⌉`` views with the highest ``p_i^ĉ`` are kept (``α = 1/4`` in the
  paper). Without majority selection every view is kept.
- entropy of view ``i``: ``e_i = -Σ_k p_i^k log p_i^k / log C`` (in [0, 1]).
- diversity of views ``i, j``: ``d_ij = Σ_k (p_i^k - p_j^k) log(p_i^k / p_j^k)``,
  the symmetric KL divergence (``d_ii = 0``).
- the paper's score is ``Σ_i Σ_j R_ij`` with ``R_ii = λ1 e_i`` and
  ``R_ij = λ2 d_ij``. Here each term is averaged so that it does not grow
  with the number of views, and the unbounded KL is squashed:
  ``E = mean_i e_i``, ``D = 1 - exp(-mean_{i≠j} d_ij)``, and
  ``u = (λ1 E + λ2 D) / (λ1 + λ2)`` in [0, 1], so the threshold policies work
  on it unchanged. The paper's variants are ``λ2 = 0`` (entropy only, utility
  ``aift_entropy``), ``λ1 = 0`` (diversity only, ``aift_diversity``) and both
  (``aift``), each with or without majority selection.
"""

import math
from dataclasses import dataclass
from typing import get_args

import numpy as np

from schemas.api import AiftUtilityName

AIFT_UTILITIES: tuple[AiftUtilityName, ...] = get_args(AiftUtilityName)
"""The utility names that need augmented views."""
_EPS = 1e-6


@dataclass(frozen=True)
class ViewSpec:
    """The augmented views of a frame, all nearest-neighbour resamplings of the input.

    Attributes:
        count: views per frame ``m``, the original included (at least 1).
        shift: largest translation, as a fraction of the side.
        scales: zoom factors used for crops (``1.1`` crops the centre 1/1.1).
        flips: also horizontal flips (off for digits and X-rays, which are not mirror-symmetric).
        rotations: rotations in degrees that may be drawn (small angles).
        seed: the views are fixed per input size: the same ``m`` transforms for every frame.
    """

    count: int = 8
    shift: float = 0.08
    scales: tuple[float, ...] = (0.9, 1.0, 1.1)
    flips: bool = False
    rotations: tuple[float, ...] = (-10.0, 0.0, 10.0)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("views need count >= 1")


def _transforms(spec: ViewSpec) -> np.ndarray:
    """``m`` affine maps (output → input coordinates, centred), the first the identity."""
    rng = np.random.default_rng(spec.seed)
    maps = [np.eye(2, 3)]
    for _ in range(spec.count - 1):
        zoom = float(rng.choice(spec.scales))
        angle = math.radians(float(rng.choice(spec.rotations)))
        flip = -1.0 if spec.flips and rng.random() < 0.5 else 1.0
        tx, ty = rng.uniform(-spec.shift, spec.shift, size=2) * 2  # [-1, 1] coordinates
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        maps.append(np.array([[cos * flip, -sin, tx], [sin * flip, cos, ty]]))
    return np.stack(maps)


def view_indices(spec: ViewSpec, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Source rows and columns of every output pixel of every view, each (m, H, W), clamped."""
    maps = _transforms(spec)
    ys = (np.arange(height) + 0.5) / height * 2 - 1
    xs = (np.arange(width) + 0.5) / width * 2 - 1
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    src_x = maps[:, 0, 0, None, None] * grid_x + maps[:, 0, 1, None, None] * grid_y
    src_y = maps[:, 1, 0, None, None] * grid_x + maps[:, 1, 1, None, None] * grid_y
    src_x = src_x + maps[:, 0, 2, None, None]
    src_y = src_y + maps[:, 1, 2, None, None]
    cols = np.clip(np.floor((src_x + 1) / 2 * width), 0, width - 1).astype(np.intp)
    rows = np.clip(np.floor((src_y + 1) / 2 * height), 0, height - 1).astype(np.intp)
    return rows, cols


class ViewMaker:
    """Builds the ``m`` views of a batch in one gather; caches the indices per input size."""

    def __init__(self, spec: ViewSpec | None = None) -> None:
        self.spec = spec or ViewSpec()
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    @property
    def count(self) -> int:
        return self.spec.count

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        """(N, C, H, W) → (N·m, C, H, W), the views of frame ``n`` at rows ``n·m … n·m+m-1``.

        Borders repeat the edge pixels, so a shifted frame sees its own background.
        """
        n, c, h, w = inputs.shape
        key = (h, w)
        if key not in self._cache:
            self._cache[key] = view_indices(self.spec, h, w)
        rows, cols = self._cache[key]
        views = inputs[:, :, rows, cols]  # (N, C, m, H, W)
        return np.ascontiguousarray(views.transpose(0, 2, 1, 3, 4)).reshape(n * self.count, c, h, w)


def _entropy(p: np.ndarray) -> np.ndarray:
    n_classes = p.shape[-1]
    plogp = p * np.log(np.where(p > 0.0, p, 1.0))
    return -plogp.sum(axis=-1) / math.log(n_classes)


def aift_terms(
    view_probabilities: np.ndarray, alpha: float = 0.25, majority: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The entropy term ``E`` and diversity term ``D`` of every frame (see the module docstring).

    Args:
        view_probabilities: (N, m, C) probabilities of each view.
        alpha: fraction of views kept by majority selection (at least one view).
        majority: apply majority selection; otherwise every view is kept.

    Returns:
        ``(E, D)``, float64 arrays of shape (N,), each in [0, 1].
    """
    p = np.clip(np.asarray(view_probabilities, dtype=np.float64), 0.0, 1.0)
    if p.ndim != 3:
        raise ValueError(f"expected view probabilities (N, m, C), got {p.shape}")
    n, m, n_classes = p.shape
    if n_classes < 2:
        return np.zeros(n), np.zeros(n)
    if majority and m > 1:
        keep = max(1, math.ceil(alpha * m))
        dominant = p.mean(axis=1).argmax(axis=1)  # ĉ per frame
        dominant_p = np.take_along_axis(p, dominant[:, None, None], axis=2)[:, :, 0]
        order = np.argsort(-dominant_p, axis=1, kind="stable")[:, :keep]
        p = np.take_along_axis(p, order[:, :, None], axis=1)
    kept = p.shape[1]
    entropy_term = _entropy(p).mean(axis=1)
    if kept < 2:
        return np.clip(entropy_term, 0, 1), np.zeros(n)
    q = np.clip(p, _EPS, 1.0)
    log_q = np.log(q)
    # d_ij = Σ_k (p_i - p_j)(log p_i - log p_j), for all pairs at once: (N, m, m)
    diff = q[:, :, None, :] - q[:, None, :, :]
    log_diff = log_q[:, :, None, :] - log_q[:, None, :, :]
    pairwise = (diff * log_diff).sum(axis=-1)
    mean_pair = pairwise.sum(axis=(1, 2)) / (kept * (kept - 1))
    diversity_term = 1.0 - np.exp(-np.maximum(mean_pair, 0.0))
    return np.clip(entropy_term, 0, 1), np.clip(diversity_term, 0, 1)


def aift_score(
    view_probabilities: np.ndarray,
    lambda1: float = 1.0,
    lambda2: float = 1.0,
    alpha: float = 0.25,
    majority: bool = True,
) -> np.ndarray:
    """AIFT utility ``(λ1 E + λ2 D) / (λ1 + λ2)`` of each frame, in [0, 1].

    Args:
        view_probabilities: (N, m, C) probabilities of each view.
        lambda1: weight of the entropy term (0: diversity only).
        lambda2: weight of the diversity term (0: entropy only).
        alpha: fraction of views majority selection keeps.
        majority: apply majority selection.
    """
    if lambda1 < 0 or lambda2 < 0 or lambda1 + lambda2 <= 0:
        raise ValueError("AIFT needs lambda1, lambda2 >= 0, not both 0")
    entropy_term, diversity_term = aift_terms(view_probabilities, alpha, majority)
    return (lambda1 * entropy_term + lambda2 * diversity_term) / (lambda1 + lambda2)


def aift_utilities(
    view_probabilities: np.ndarray, alpha: float = 0.25, majority: bool = True
) -> dict[str, np.ndarray]:
    """The three AIFT variants by utility name: ``aift`` (λ1 = λ2 = 1), entropy, diversity."""
    entropy_term, diversity_term = aift_terms(view_probabilities, alpha, majority)
    return {
        "aift": (entropy_term + diversity_term) / 2,
        "aift_entropy": entropy_term,
        "aift_diversity": diversity_term,
    }
