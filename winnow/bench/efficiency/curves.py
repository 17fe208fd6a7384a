"""The arithmetic of learning curves: smoothing, labels to a target, ratios over seeds.

Everything here is pure numpy on plain lists, so it is tested with known answers
and no model.

Smoothing. A per-seed curve is noisy (a round of a few labels moves the test
accuracy by a point or two either way), so the first label count at which the
raw curve touches a target depends on luck. The curve is smoothed by isotonic
regression (the pool-adjacent-violators algorithm): the non-decreasing curve
closest to the measurements in least squares. Accuracy is expected to grow with
labels, so that is the right shape; isotonic regression needs no bandwidth, and
unlike a running maximum it averages a lucky spike with the dip after it
instead of keeping the spike, which would credit a strategy with reaching the
target early by chance.

Censoring. A seed whose smoothed curve never reaches the target within the
labels of the run is censored: its labels-to-target is only known to exceed
the last label count its run reached. Ratios use a bound in its place. Random's
is its last label count (``--max-labels``, or fewer where the stream ran out
first: the run is known to need more than it reached, not more than the
budget), which understates the strategy's saving. The strategy's is
``--max-labels``, which may overstate that seed's ratio, but the ratio is at most
1 there anyway (random's measured count is within the budget). Where both are
censored the ratio is 1. The number of censored seeds is reported next to every
ratio.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

BALANCED_SHARE = 0.6
"""A stream is imbalanced when a class is under this fraction of its balanced share
(``BALANCED_SHARE / C``): under 30% of the stream for two classes, 6% for ten."""


def isotonic(values: Sequence[float], weights: Sequence[float] | None = None) -> np.ndarray:
    """The non-decreasing least-squares fit of ``values`` (pool adjacent violators).

    Args:
        values: measurements in order of their x.
        weights: positive weight of each measurement (1 each by default).

    Returns:
        The fitted values, as many as given.
    """
    y = np.asarray(values, dtype=np.float64)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64)
    # Blocks of pooled points: their mean, weight and length.
    means: list[float] = []
    mass: list[float] = []
    sizes: list[int] = []
    for value, weight in zip(y.tolist(), w.tolist(), strict=True):
        means.append(value)
        mass.append(weight)
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            total = mass[-2] + mass[-1]
            merged = (means[-2] * mass[-2] + means[-1] * mass[-1]) / total
            size = sizes[-2] + sizes[-1]
            del means[-1], mass[-1], sizes[-1]
            means[-1], mass[-1], sizes[-1] = merged, total, size
    return np.repeat(np.asarray(means), sizes)


def labels_to_target(
    labels: Sequence[float], values: Sequence[float], target: float
) -> float | None:
    """Labels at which the isotonic fit of a curve first reaches ``target``.

    Linear interpolation between the last measured count below the target and
    the first at or above it.

    Args:
        labels: label counts, increasing.
        values: the measure at each count.
        target: the level to reach.

    Returns:
        The (fractional) label count, or None when the curve never reaches it
        (censored).
    """
    if len(labels) == 0:
        return None
    smooth = isotonic(values)
    above = np.flatnonzero(smooth >= target)
    if len(above) == 0:
        return None
    i = int(above[0])
    if i == 0:
        return float(labels[0])
    x0, x1 = float(labels[i - 1]), float(labels[i])
    y0, y1 = float(smooth[i - 1]), float(smooth[i])
    return x0 + (target - y0) / (y1 - y0) * (x1 - x0)


def value_at(labels: Sequence[float], values: Sequence[float], count: float) -> float | None:
    """The measure at ``count`` labels, linearly interpolated; None outside the curve."""
    if len(labels) == 0 or count < labels[0] or count > labels[-1]:
        return None
    return float(np.interp(count, labels, values))


def aulc(labels: Sequence[float], values: Sequence[float], max_labels: float) -> float:
    """Normalised area under the learning curve: the mean measure over ``[labels[0], max_labels]``.

    Trapezoids between measured points; a curve that stops before ``max_labels``
    (the stream ran out) is held at its last value. 1.0 is a perfect learner
    from the first label count on.
    """
    if len(labels) == 0 or max_labels <= labels[0]:
        return math.nan
    x = [float(v) for v in labels]
    y = [float(v) for v in values]
    if x[-1] < max_labels:
        x.append(float(max_labels))
        y.append(y[-1])
    x_arr, y_arr = np.asarray(x), np.asarray(y)
    keep = x_arr <= max_labels
    area = float(
        np.sum((x_arr[keep][1:] - x_arr[keep][:-1]) * (y_arr[keep][1:] + y_arr[keep][:-1]))
    )
    return area / 2 / (max_labels - x[0])


def savings_ratios(
    random: Sequence[float | None],
    strategy: Sequence[float | None],
    bound: float,
    random_reached: Sequence[float],
) -> tuple[list[float], int, int]:
    """Per seed, random's labels-to-target over the strategy's, censored values bounded.

    Args:
        random: random's labels-to-target per seed (None: censored).
        strategy: the strategy's, for the same seeds in the same order.
        bound: the run's label budget (``--max-labels``): a censored strategy
            seed counts as needing this many.
        random_reached: per seed, the labels random's run reached; a censored
            random seed counts as needing this many (at most ``bound``).
            A stream that ran out before the budget leaves random short of
            ``bound``, and counting it at ``bound`` would overstate the saving.

    Returns:
        The ratios (1 where both are censored), how many seeds random left
        censored and how many the strategy did.
    """
    ratios: list[float] = []
    for r, s, r_bound in zip(random, strategy, random_reached, strict=True):
        if r is None and s is None:
            ratios.append(1.0)
            continue
        # A target met before the first label (an untrained model) counts as one label.
        r_labels = min(r_bound, bound) if r is None else r
        ratios.append(max(r_labels, 1.0) / max(bound if s is None else s, 1.0))
    censored_random = sum(r is None for r in random)
    censored_strategy = sum(s is None for s in strategy)
    return ratios, censored_random, censored_strategy


def geometric_mean(values: Sequence[float]) -> float:
    """``exp(mean(log v))``: the mean of ratios that treats 2x and 0.5x symmetrically."""
    if len(values) == 0:
        return math.nan
    return float(np.exp(np.mean(np.log(np.asarray(values, dtype=np.float64)))))


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[Any], float],
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over resampled seeds.

    The values are per-seed quantities of a paired comparison (a ratio or a
    difference within one seed), so resampling them resamples seeds with both
    sides of the pair together.

    Args:
        values: one value per seed.
        statistic: of an array of values, e.g. :func:`geometric_mean`.
        resamples: bootstrap draws.
        level: coverage of the interval.
        seed: seeds the draws, so the interval is reproducible.

    Returns:
        ``(low, high)``; NaNs for no values.
    """
    data = np.asarray(values, dtype=np.float64)
    if len(data) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(data), size=(resamples, len(data)))
    stats = np.array([statistic(data[row]) for row in draws])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


EXACT_SIGN_FLIPS = 16
"""Up to this many seeds the sign-flip test enumerates every pattern (2^16 = 65,536)."""


def sign_flip_p(diffs: Sequence[float], draws: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of a mean paired difference of zero: the sign-flip permutation test.

    Under the null each seed's difference is as likely to have either sign, so the
    observed ``|mean|`` is ranked among the means with every pattern of signs (all
    ``2^n`` up to :data:`EXACT_SIGN_FLIPS` seeds, else ``draws`` random patterns with the
    observed one counted in). It assumes no distribution, as the bootstrap intervals
    beside it do; with n seeds it cannot go below ``2 / 2^n`` (10 seeds: 0.002).

    Returns:
        The p-value; NaN for no differences.
    """
    data = np.asarray(diffs, dtype=np.float64)
    n = len(data)
    if n == 0:
        return math.nan
    observed = abs(float(data.mean()))
    tolerance = 1e-12 * max(1.0, observed)
    if n <= EXACT_SIGN_FLIPS:
        patterns = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
        means = np.abs(((patterns * 2 - 1) * data).mean(axis=1))
        return float(np.mean(means >= observed - tolerance))
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(draws, n))
    hits = int(np.sum(np.abs((signs * data).mean(axis=1)) >= observed - tolerance))
    return (hits + 1) / (draws + 1)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaNs stay NaN, outside the
    family): an adjusted value under 0.05 is significant at 5 % for the whole family, so
    that one comparison among twenty at p = 0.04 is not read as a finding."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(len(p), math.nan)
    known = np.flatnonzero(~np.isnan(p))
    order = known[np.argsort(p[known], kind="stable")]
    m, running = len(order), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p[index])))
        out[index] = running
    return [float(v) for v in out]


def mean(values: np.ndarray) -> float:
    """The arithmetic mean (a named function, to hand to :func:`bootstrap_ci`)."""
    return float(np.mean(values))


def share_at_least(values: Sequence[float], threshold: float) -> float:
    """The fraction of values at ``threshold`` or more (e.g. seeds with 2x savings)."""
    if len(values) == 0:
        return math.nan
    return float(np.mean(np.asarray(values) >= threshold))


def confusion(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """``C x C`` counts: row the true class, column the predicted one."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(truth), np.asarray(predicted)), 1)
    return counts


def accuracy(counts: np.ndarray) -> float:
    """The fraction of correct predictions."""
    total = counts.sum()
    return float(np.trace(counts) / total) if total else math.nan


def recalls(counts: np.ndarray) -> np.ndarray:
    """Per class, the fraction of its frames predicted as it (NaN for a class with none)."""
    support = counts.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(support > 0, np.diag(counts) / np.maximum(support, 1), np.nan)


def balanced_accuracy(counts: np.ndarray) -> float:
    """The mean recall over the classes present (Brodersen et al., ICPR 2010)."""
    per_class = recalls(counts)
    present = per_class[~np.isnan(per_class)]
    return float(present.mean()) if len(present) else math.nan


def is_imbalanced(class_counts: Sequence[int], share: float = BALANCED_SHARE) -> bool:
    """Whether a class is under ``share / C`` of the stream (see :data:`BALANCED_SHARE`)."""
    counts = np.asarray(class_counts, dtype=np.float64)
    if len(counts) < 2 or counts.sum() == 0:
        return False
    return bool((counts / counts.sum()).min() < share / len(counts))
