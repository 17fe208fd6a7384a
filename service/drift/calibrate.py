"""Thresholds for an expected run time between false alarms (ERT), by simulation.

As Alibi Detect's online detectors do (Cobb et al., AISTATS 2022), streams are
bootstrapped from reference data, the detectors run on each, and the
thresholds are chosen from the simulated statistics: those whose simulated
first-alarm times average the ERT. A threshold never changes a trajectory up
to its first alarm, so every candidate threshold is read off the same
trajectories; bisection finds the one that fits, all vectorized. Each
simulated stream is offset from the reference by the error of a reference
estimated from as many frames as the real one (see ``Detector.trajectories``):
the ERT is an expectation over streams and references alike.
"""

import math
from collections.abc import Iterable, Sequence

import numpy as np

from schemas.drift import DriftReference
from service.config import DriftSettings
from service.drift.detectors import Block, Detector, Rows, build_detectors

DEFAULT_CELLS = 1_200_000


class FirstAlarms:
    """First-alarm times of simulated streams as a function of the threshold.

    A threshold never changes a trajectory up to its first alarm, so the first
    alarm at threshold h is the first frame whose running maximum exceeds h:
    the first of the running maximum's records (the frames where it rises)
    above h. Keeping only the records makes each threshold cheap to try.
    """

    def __init__(self, trajectories: np.ndarray, fill: int = 1) -> None:
        """``trajectories``: R x L statistics (``from_blocks`` for them in parts)."""
        self._build(trajectories.shape, [Block(0, 0, trajectories)], fill)

    @classmethod
    def from_blocks(
        cls, blocks: Iterable[Block], shape: tuple[int, int], fill: int = 1
    ) -> "FirstAlarms":
        """From R x L statistics given in parts (``Detector.trajectory_blocks``; each
        stream's parts in time order): only the records are kept, so the statistics are
        never all held at once."""
        alarms = cls.__new__(cls)
        alarms._build(shape, blocks, fill)
        return alarms

    def _build(self, shape: tuple[int, int], blocks: Iterable[Block], fill: int) -> None:
        self.runs, self.length = shape
        self.fill = fill
        reached = np.full(self.runs, -np.inf)  # each run's maximum before the block
        runs, times, values = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0)]
        for block in blocks:
            count = len(block.values)
            before = reached[block.first : block.first + count]
            peak = np.maximum.accumulate(block.values, axis=1)
            np.maximum(peak, before[:, None], out=peak)
            rises = np.empty(peak.shape, dtype=bool)
            rises[:, 0] = peak[:, 0] > before if block.start else True  # each run has t = 0
            rises[:, 1:] = peak[:, 1:] > peak[:, :-1]
            run, time = np.nonzero(rises)
            runs.append(run + block.first)
            times.append(time + block.start)
            values.append(peak[run, time])
            before[:] = peak[:, -1]
        run, time = np.concatenate(runs), np.concatenate(times)
        order = np.lexsort((time, run))  # by run, each in time order
        run, self._time, self._value = run[order], time[order], np.concatenate(values)[order]
        self._starts = np.searchsorted(run, np.arange(self.runs))
        self._ends = np.append(self._starts[1:], len(run))
        finite = self._value[np.isfinite(self._value)]
        self.lowest = float(finite.min()) if finite.size else math.inf
        self.highest = float(finite.max()) if finite.size else math.inf

    def at(self, threshold: float) -> np.ndarray:
        """Frames before the first alarm in each run (the run's length where none)."""
        # a run's records rise, so those at or below the threshold come first
        below = np.add.reduceat((self._value <= threshold).astype(np.int64), self._starts)
        at = self._starts + below
        first = np.full(self.runs, self.length)
        alarmed = at < self._ends
        first[alarmed] = self._time[at[alarmed]]
        return first

    def mean_run(self, first: np.ndarray, fill: int | None = None) -> float:
        """Mean run length from first-alarm times (runs without an alarm are censored).

        The frames seen by the end of the streams, plus, for the runs still without an
        alarm, the expected frames to come at the rate of alarms over the streams'
        second half. Streams differ in how far their reference is off (a per-run
        offset), and those still quiet at the end are the slow ones: the late rate
        is theirs. With one rate for all, this is the exponential maximum-likelihood
        estimate (frames at risk over alarms)."""
        length = self.length
        alarms = int((first < length).sum())
        if alarms == 0:
            return math.inf
        at_risk_start = max(0, (self.fill if fill is None else fill) - 1)
        seen = np.minimum(first + 1, length)
        censored = len(first) - alarms
        half = max(at_risk_start, length // 2)
        late_alarms = int(((first >= half) & (first < length)).sum())
        if censored == 0 or late_alarms == 0:
            exposure = float(seen.sum()) - len(first) * at_risk_start
            return at_risk_start + exposure / alarms
        late_exposure = float((np.clip(seen, half, length) - half).sum())
        return float(seen.mean()) + censored / len(first) * late_exposure / late_alarms

    def threshold(self, ert: float) -> float:
        """The threshold whose mean run length over the streams is ``ert`` frames."""
        lo, hi = self.lowest, self.highest
        if not math.isfinite(lo) or self.mean_run(self.at(lo)) >= ert:
            return lo
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if self.mean_run(self.at(mid)) < ert:
                lo = mid
            else:
                hi = mid
        return hi


def threshold_for_ert(trajectories: np.ndarray, ert: float, fill: int = 1) -> float:
    """The threshold whose mean first-alarm time over the trajectories is ``ert`` frames."""
    return FirstAlarms(trajectories, fill).threshold(ert)


class Simulation:
    """Detectors run on the same bootstrap streams of a reference pool.

    ``thresholds(ert)`` gives each detector its own ERT; ``together(ert)``
    gives them one ERT as a group: the first alarm from any of them comes every
    ``ert`` frames. Each detector then gets the threshold of a common
    per-detector ERT, found by bisection; correlated detectors (a shift in the
    embedding moves the entropy too) get lower thresholds than the
    ``len(detectors) x ert`` that independent ones would need.
    """

    def __init__(
        self,
        detectors: Sequence[Detector],
        pool: Rows,
        ert: int,
        seed: int = 0,
        cells: int = DEFAULT_CELLS,
        reference_frames: int | None = None,
    ) -> None:
        self.detectors = list(detectors)
        length = int(max(3 * ert, 4 * max(d.fill for d in self.detectors), 256))
        rng = np.random.default_rng(seed)
        runs = int(max(48, cells // length))
        # the smallest type that holds a row of the pool (a reference sample of a few
        # hundred rows: 2 bytes a cell, a quarter of the default int64)
        dtype = np.min_scalar_type(max(0, len(pool) - 1))
        index = rng.integers(len(pool), size=(runs, length), dtype=dtype)
        frames = reference_frames or len(pool)
        self._first = [
            FirstAlarms.from_blocks(d.trajectory_blocks(pool, index, frames), index.shape, d.fill)
            for d in self.detectors
        ]

    def thresholds(self, ert: float) -> list[float]:
        """Each detector's threshold for ``ert`` frames between its own false alarms."""
        return [first.threshold(ert) for first in self._first]

    def together(self, ert: float) -> list[float]:
        """Thresholds for ``ert`` frames between false alarms of the detectors as a group."""
        return self.thresholds(self.each_ert(ert))

    def each_ert(self, ert: float) -> float:
        """The per-detector ERT whose thresholds give the group ``ert`` frames between false
        alarms (``ert`` itself for one detector)."""
        if len(self._first) == 1:
            return ert
        fill = min(d.fill for d in self.detectors)

        def group_run(thresholds: list[float]) -> float:
            pairs = zip(self._first, thresholds, strict=True)
            first = np.min([alarms.at(h) for alarms, h in pairs], axis=0)
            return self._first[0].mean_run(first, fill)

        lo, hi = math.log(ert), math.log(ert * len(self._first) * 4)
        for _ in range(16):
            mid = 0.5 * (lo + hi)
            if group_run(self.thresholds(math.exp(mid))) < ert:
                lo = mid
            else:
                hi = mid
        return math.exp(hi)

    def apply(self, thresholds: list[float]) -> None:
        for detector, threshold in zip(self.detectors, thresholds, strict=True):
            detector.threshold = threshold


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
    simulation = Simulation([detector], pool, ert, seed, cells, reference_frames)
    simulation.apply(simulation.thresholds(ert))
    return detector.threshold


def calibrated(
    reference: DriftReference,
    settings: DriftSettings,
    names: Sequence[str] | None = None,
    each_ert: float | None = None,
) -> tuple[list[Detector], float]:
    """The scorer's detectors on ``reference``, calibrated (seconds of CPU: run it in a thread).

    Args:
        reference: what the detectors compare the stream with.
        settings: windows, ERT and its scope, simulation size and seed.
        names: the detectors to build; None: those of the settings.
        each_ert: the per-detector ERT to calibrate to; None: the settings' ERT, for
            each detector or for the detectors together (``ert_scope=monitor``).
            Detectors recalibrated apart from the rest pass what those were given.

    Returns:
        The detectors and the per-detector ERT of their thresholds.
    """
    s = settings
    detectors = build_detectors(
        reference,
        s.detectors if names is None else names,
        embedding_window=s.embedding_window,
        class_window=s.class_window,
        cusum_k=s.cusum_k,
    )
    simulation = Simulation(
        detectors,
        Rows.reference_pool(reference),
        s.ert,
        s.seed,
        s.calibration_frames,
        reference.frames,
    )
    if each_ert is None:
        each_ert = simulation.each_ert(s.ert) if s.ert_scope == "monitor" else float(s.ert)
    simulation.apply(simulation.thresholds(each_ert))
    return detectors, each_ert
