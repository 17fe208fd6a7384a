"""Thresholds for an expected run time between false alarms (ERT), by simulation.

As Alibi Detect's online detectors do (Cobb et al., AISTATS 2022), streams are
bootstrapped from reference data, the detector runs on each, and the
threshold is chosen from the simulated statistics. Here the threshold is the
one whose simulated first-alarm times average the ERT: for each candidate
threshold the first alarm of every stream is read off the statistic
trajectories (a threshold never changes a trajectory up to its first alarm),
streams without an alarm are censored, and the mean run length is the
exponential maximum-likelihood estimate (frames at risk over alarms) plus the
window fill. Bisection on the threshold, all vectorized.
"""

import math

import numpy as np

from service.drift.detectors import Detector, Rows

DEFAULT_CELLS = 1_200_000


def simulate(
    detector: Detector,
    pool: Rows,
    ert: int,
    rng: np.random.Generator,
    cells: int = DEFAULT_CELLS,
    reference_frames: int | None = None,
) -> np.ndarray:
    """Statistic trajectories of bootstrap streams from ``pool`` (R x L, L = 3 ERT)."""
    length = int(max(3 * ert, 4 * detector.fill, 256))
    runs = int(max(48, cells // length))
    index = rng.integers(len(pool), size=(runs, length))
    return detector.trajectories(pool, index, reference_frames or len(pool))


def threshold_for_ert(trajectories: np.ndarray, ert: float, fill: int = 1) -> float:
    """The threshold whose mean first-alarm time over the trajectories is ``ert`` frames."""
    runs, length = trajectories.shape
    peak = np.maximum.accumulate(trajectories, axis=1)
    finite = trajectories[np.isfinite(trajectories)]
    if finite.size == 0:
        return math.inf
    lo, hi = float(finite.min()), float(finite.max())
    at_risk_start = max(0, fill - 1)

    def mean_run(h: float) -> float:
        below = (peak <= h).sum(axis=1)  # frames before the first alarm, L if none
        alarms = int((below < length).sum())
        if alarms == 0:
            return math.inf
        exposure = float(np.minimum(below + 1, length).sum()) - runs * at_risk_start
        return at_risk_start + exposure / alarms

    if mean_run(lo) >= ert:
        return lo
    for _ in range(48):
        mid = 0.5 * (lo + hi)
        if mean_run(mid) < ert:
            lo = mid
        else:
            hi = mid
    return hi


def calibrate(
    detector: Detector,
    pool: Rows,
    ert: int,
    seed: int = 0,
    cells: int = DEFAULT_CELLS,
    reference_frames: int | None = None,
) -> float:
    """Sets and returns ``detector.threshold`` for ``ert`` frames between false alarms.

    Args:
        detector: the detector, on its reference.
        pool: the reference sample to bootstrap streams from.
        ert: expected frames between false alarms.
        seed: seeds the bootstrap.
        cells: frames simulated in all (runs x length).
        reference_frames: frames the reference statistics were estimated from.
    """
    rng = np.random.default_rng(seed)
    trajectories = simulate(detector, pool, ert, rng, cells, reference_frames)
    detector.threshold = threshold_for_ert(trajectories, ert, detector.fill)
    return detector.threshold
