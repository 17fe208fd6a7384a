"""The online drift detectors: embedding MMD, class mix, entropy CUSUM.

Each detector turns a stream of frames (reduced embedding, predicted class,
normalized entropy) into a statistic per frame and alarms when it exceeds a
threshold calibrated to an expected run time between false alarms (ERT, see
``service.drift.calibrate``). After an alarm a detector resets: its window
refills before it can alarm again, so one change gives one alarm, not a storm.

The same code gives the serving path (``update``, stateful, a batch at a
time) and calibration and benchmarks (``trajectories``, stateless, many
bootstrap streams at once, vectorized).
"""

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from schemas.drift import DriftReference, fourier_features

_NORMAL = NormalDist()
_CHUNK_CELLS = 32_768
"""Floats per vectorized block in ``trajectory_blocks()`` (256 KiB of float64): the size of
a calibration's work arrays, and so the scorer's memory swing (it recalibrates its
detectors for each backbone release and its head detectors for head releases, seconds
apart in a soak). At the default settings (ERT 10,000: 48 streams of 30,000 frames; 64
Fourier features, 10 classes) a calibration peaks at 5.0 MiB of arrays under
``tracemalloc``, 2.9 of them the bootstrap index, and takes 1.4 s of CPU with the scorer's
allocator settings; at 250,000 floats a block, with a fresh array for every step and an
int32 index, it peaked at 15.4 MiB and took 3.4 s; 37 to 38 MiB when the statistics were
held whole (``FirstAlarms`` reads them a block at a time).
Thresholds are equal at every block size. A block takes a slice of the features when one
stream is larger (a backbone's embedding detector: 30,000 frames, one feature a block)."""


Columns = Callable[[slice, np.ndarray], None]
"""Writes the features of a block of runs, a slice of features at a time, into the r x L x
(that many) array it is given."""


@dataclass(frozen=True)
class Block:
    """Part of the statistics of R simulated streams: ``values`` (r x c) are streams
    ``first`` to ``first + r`` at frames ``start`` to ``start + c``."""

    first: int
    start: int
    values: np.ndarray


@dataclass(frozen=True)
class Rows:
    """Frames as the detectors see them."""

    reduced: np.ndarray  # n x k, float32, in the reference's whitened PCA space
    classes: np.ndarray  # n, int, predicted class
    entropy: np.ndarray  # n, float, normalized entropy in [0, 1]

    def __len__(self) -> int:
        return len(self.classes)

    def take(self, index: np.ndarray | slice) -> "Rows":
        return Rows(self.reduced[index], self.classes[index], self.entropy[index])

    @classmethod
    def from_outputs(
        cls, reference: DriftReference, embeddings: np.ndarray, probabilities: np.ndarray
    ) -> "Rows":
        from schemas.drift import normalized_entropy

        return cls(
            reference.reduce(embeddings),
            np.asarray(probabilities).argmax(axis=1),
            normalized_entropy(probabilities),
        )

    @classmethod
    def reference_pool(cls, reference: DriftReference) -> "Rows":
        """The reference's stored sample: what calibration bootstraps streams from."""
        return cls(
            np.asarray(reference.sample, dtype=np.float32),
            np.asarray(reference.sample_classes, dtype=np.int64),
            np.asarray(reference.sample_entropy, dtype=np.float64),
        )


class Detector(ABC):
    """One online detector; ``threshold`` is infinite until calibrated."""

    name: str
    window: int  # frames in the window; 0 for a detector without one

    def __init__(self) -> None:
        self.threshold = math.inf
        self.statistic = math.nan
        self.frames = 0  # since the last reset

    def trajectories(
        self, pool: Rows, index: np.ndarray, reference_frames: int | None = None
    ) -> np.ndarray:
        """Statistics of R streams (``pool`` rows picked by the R x L ``index``); -inf where
        the detector cannot alarm yet (its window is filling).

        With ``reference_frames`` (calibration), the pool's per-frame features are
        shifted so that their mean is the reference's (a sample of a few hundred frames
        is off by its own sampling error, which would bias the threshold), then each
        stream gets its own offset, drawn as the error of a reference estimated from
        ``reference_frames`` frames: the live stream is off the reference by that much.
        """
        out = np.empty(index.shape, dtype=np.float64)
        for block in self.trajectory_blocks(pool, index, reference_frames):
            rows, cols = block.values.shape
            out[block.first : block.first + rows, block.start : block.start + cols] = block.values
        return out

    @abstractmethod
    def trajectory_blocks(
        self, pool: Rows, index: np.ndarray, reference_frames: int | None = None
    ) -> Iterator[Block]:
        """``trajectories`` a block at a time (about ``_CHUNK_CELLS`` floats each; each
        stream's frames in time order), so that a calibration never holds every stream's
        statistics at once."""

    @abstractmethod
    def _statistics(self, rows: Rows) -> np.ndarray:
        """Statistics after each of ``rows``, continuing from the state; advances the state."""

    @abstractmethod
    def reset(self) -> None:
        """Forgets the stream (after an alarm, or a new reference)."""

    @property
    def fill(self) -> int:
        """Frames needed after a reset before the statistic exists."""
        return max(1, self.window)

    def fresh(self) -> "Detector":
        """A copy with the same reference and threshold and an empty state."""
        other = copy.deepcopy(self)
        other.reset()
        return other

    def update(self, rows: Rows) -> list[tuple[int, float]]:
        """Feeds a batch; returns the alarms as (row index, statistic)."""
        alarms: list[tuple[int, float]] = []
        start = 0
        while start < len(rows):
            part = rows.take(slice(start, None))
            stats = self._statistics(part)
            over = np.flatnonzero(stats > self.threshold)
            if len(over) == 0:
                self.statistic = float(stats[-1])
                break
            at = int(over[0])
            alarms.append((start + at, float(stats[at])))
            self.statistic = float(stats[at])
            self.reset()
            start += at + 1
        return alarms


class _Windowed(Detector):
    """A statistic of the sum of per-frame features over a sliding window of frames."""

    def __init__(self, window: int) -> None:
        super().__init__()
        if window < 2:
            raise ValueError("a window needs at least 2 frames")
        self.window = window
        self._tail: np.ndarray | None = None  # the last window-1 feature rows

    @abstractmethod
    def features(self, rows: Rows) -> np.ndarray: ...

    @abstractmethod
    def terms(self, sums: np.ndarray, features: slice = slice(None)) -> np.ndarray:
        """Turns window sums (... x F, or only the ``features`` of F) into the statistic's
        term for each feature, in place (the statistic is their sum); returns ``sums``."""

    def from_sums(self, sums: np.ndarray, features: slice = slice(None)) -> np.ndarray:
        """Statistic from window sums (... x F), or its part over ``features`` when ``sums``
        holds only those; overwrites ``sums``."""
        return np.asarray(self.terms(sums, features).sum(axis=-1))

    def reset(self) -> None:
        self._tail = None
        self.frames = 0
        self.statistic = math.nan

    def _statistics(self, rows: Rows) -> np.ndarray:
        new = self.features(rows)
        buf = new if self._tail is None else np.concatenate([self._tail, new])
        cs = np.concatenate([np.zeros((1, buf.shape[1]), buf.dtype), np.cumsum(buf, axis=0)])
        w, held = self.window, len(buf) - len(new)  # the tail holds min(frames, w - 1) rows
        ends = np.arange(held, len(buf)) + 1  # prefix lengths after each new frame
        starts = np.maximum(ends - w, 0)
        stats = self.from_sums(cs[ends] - cs[starts])
        stats[(self.frames + np.arange(1, len(new) + 1)) < w] = -np.inf
        self.frames += len(new)
        self._tail = buf[-(w - 1) :].copy()
        return stats

    @abstractmethod
    def expected(self) -> np.ndarray:
        """The reference's mean per-frame feature."""

    def trajectory_blocks(
        self, pool: Rows, index: np.ndarray, reference_frames: int | None = None
    ) -> Iterator[Block]:
        feats = self.features(pool).astype(np.float64)
        offsets = np.zeros((len(index), feats.shape[1]))
        if reference_frames is not None:
            feats = feats - feats.mean(axis=0)
            offsets = _reference_error(feats, len(index), reference_frames, index)
            feats += self.expected()
        runs, length = index.shape

        def block(rows: slice) -> Columns:
            picked = index[rows]

            def columns(features: slice, out: np.ndarray) -> None:
                np.take(feats[:, features], picked, axis=0, out=out, mode="clip")  # valid rows

            return columns

        return self._window_stats(block, runs, length, offsets)

    def _window_stats(
        self, block: Callable[[slice], Columns], runs: int, length: int, offsets: np.ndarray
    ) -> Iterator[Block]:
        """Window statistics of the runs, a block of runs at a time: ``block(rows)`` writes
        their r x L x F features a slice of features at a time; ``offsets`` (runs x F) shift
        every window mean.

        Every block works in the same three arrays, allocated once: a fresh array per step
        would cost page faults on each (the scorer maps every array over 128 KiB afresh,
        see ``infra.allocator``), which took more CPU than the arithmetic."""
        width = offsets.shape[1]
        span = min(max(1, width), max(1, _CHUNK_CELLS // length))  # features per block
        step = max(1, _CHUNK_CELLS // (length * span))  # runs per block
        w = self.window
        cumulative = np.empty((min(step, runs), length, span), dtype=np.float64)
        sums = np.empty_like(cumulative)
        total = np.empty(cumulative.shape[:2], dtype=np.float64)
        for first in range(0, runs, step):
            rows = slice(first, first + step)
            r = min(step, runs - first)
            columns = block(rows)
            out = np.zeros((r, length), dtype=np.float64)
            for start in range(0, width, span):
                features = slice(start, min(start + span, width))
                f = features.stop - start
                cs, part, added = cumulative[:r, :, :f], sums[:r, :, :f], total[:r]
                columns(features, cs)
                np.cumsum(cs, axis=1, out=cs)
                part[:, :w] = cs[:, :w]
                np.subtract(cs[:, w:], cs[:, :-w], out=part[:, w:])
                part += w * offsets[rows, None, features]
                np.sum(self.terms(part, features), axis=-1, out=added)
                out += added
            out[:, : w - 1] = -np.inf
            yield Block(first, 0, out)


class EmbeddingMMD(_Windowed):
    """Online MMD between the reference and a sliding window of reduced embeddings.

    In the manner of Alibi Detect's ``MMDDriftOnline`` (Cobb et al., "Sequential
    multivariate change detection with calibrated and memoryless false
    detection rates", AISTATS 2022): a reference set against a sliding test
    window of ``window`` frames, updated incrementally, with a threshold from
    bootstrap streams of reference data. The Gaussian kernel (bandwidth by the
    median heuristic) is approximated by random Fourier features (Rahimi and
    Recht, NIPS 2007), so MMD² = |mean φ(window) - mean φ(reference)|² and
    the window sum is a running sum: O(F) per frame.
    """

    name = "embedding"

    def __init__(self, reference: DriftReference, window: int) -> None:
        super().__init__(window)
        features = len(reference.feature_mean)
        self._freqs, self._phases = fourier_features(
            reference.k, features, reference.bandwidth, reference.feature_seed
        )
        self._scale = np.float32(np.sqrt(2.0 / features))
        self._mean = np.asarray(reference.feature_mean, dtype=np.float64)

    def features(self, rows: Rows) -> np.ndarray:
        z = np.asarray(rows.reduced, dtype=np.float32)
        return np.cos(z @ self._freqs + self._phases) * self._scale

    def expected(self) -> np.ndarray:
        return self._mean

    def terms(self, sums: np.ndarray, features: slice = slice(None)) -> np.ndarray:
        sums /= self.window
        sums -= self._mean[features]
        return np.square(sums, out=sums)


class ClassMixDrift(_Windowed):
    """Prediction drift: Pearson's chi-square of the predicted-class counts in a sliding
    window against the reference class mix (Laplace-smoothed)."""

    name = "prediction"

    def __init__(self, reference: DriftReference, window: int) -> None:
        super().__init__(window)
        mix = np.asarray(reference.class_mix, dtype=np.float64)
        n = reference.frames
        self._p = (mix * n + 1) / (n + len(mix))
        self._classes = len(mix)

    def features(self, rows: Rows) -> np.ndarray:
        classes = np.clip(np.asarray(rows.classes, dtype=np.int64), 0, self._classes - 1)
        return np.eye(self._classes, dtype=np.float32)[classes]

    def expected(self) -> np.ndarray:
        return self._p

    def trajectory_blocks(
        self, pool: Rows, index: np.ndarray, reference_frames: int | None = None
    ) -> Iterator[Block]:
        """With ``reference_frames`` (calibration), classes are drawn from the smoothed
        reference mix, perturbed per run by the error of a mix estimated from that many
        frames, instead of from the pool: a class the pool lacks still has its (small)
        reference probability, so a one-class reference does not give a zero threshold."""
        if reference_frames is None:
            return super().trajectory_blocks(pool, index, None)
        runs, length = index.shape
        rng = np.random.default_rng(int(index[0, 0]) + 13 * runs)
        # each run's mix is off the (smoothed) reference mix by the error of a mix counted
        # over reference_frames frames; smoothing the counts again would shrink that error
        mixes = rng.multinomial(reference_frames, self._p, size=runs) / reference_frames
        cdf = np.cumsum(mixes, axis=1)
        cdf[:, -1] = 1.0
        eye = np.eye(self._classes, dtype=np.float64)

        def block(rows: slice) -> Columns:  # the classes drawn once, one-hot per slice
            u = rng.random((len(cdf[rows]), length))
            classes = np.stack([np.searchsorted(c, x) for c, x in zip(cdf[rows], u, strict=True)])
            classes = np.minimum(classes, self._classes - 1)

            def columns(features: slice, out: np.ndarray) -> None:
                np.take(eye[:, features], classes, axis=0, out=out, mode="clip")  # valid rows

            return columns

        return self._window_stats(block, runs, length, np.zeros((runs, self._classes)))

    def terms(self, sums: np.ndarray, features: slice = slice(None)) -> np.ndarray:
        expected = self.window * self._p[features]
        sums -= expected
        np.square(sums, out=sums)
        sums /= expected
        return sums


class EntropyCusum(Detector):
    """Uncertainty drift: two-sided CUSUM (Page, Biometrika 1954) on the normal scores of
    the normalized entropy, ``S+ = max(0, S+ + x - k)``, ``S- = max(0, S- - x - k)``; the
    statistic is ``max(S+, S-)``.

    Entropy is skewed: most frames are near 0 and a few near 1. Standardized, those few
    make big jumps whose frequency a reference sample of a few hundred frames pins down
    poorly, and the calibrated run length strays from the ERT (measured on digits: +14
    to +53 % at ERTs of 1,000 and 1,400).
    Normal scores (the frame's quantile in the reference, through the inverse normal
    CDF) make the undrifted stream close to standard normal."""

    name = "uncertainty"
    window = 0

    def __init__(self, reference: DriftReference, k: float = 0.5) -> None:
        super().__init__()
        self._k = k
        self._up = self._down = 0.0
        values = np.sort(np.asarray(reference.sample_entropy, dtype=np.float64))
        scores = np.array([_NORMAL.inv_cdf((i + 0.5) / len(values)) for i in range(len(values))])
        self._grid, slot = np.unique(values, return_inverse=True)
        self._scores = np.bincount(slot, scores) / np.bincount(slot)
        self._sd = reference.entropy_std

    def reset(self) -> None:
        self._up = self._down = 0.0
        self.frames = 0
        self.statistic = math.nan

    def _x(self, entropy: np.ndarray) -> np.ndarray:
        """Normal scores: the reference's quantile of each entropy through the inverse
        normal CDF, linear between the reference's values; beyond them, the outermost
        score plus the distance in reference standard deviations, so that frames far
        outside the reference weigh in as far as they are."""
        e = np.asarray(entropy, dtype=np.float64)
        if len(self._grid) < 2:
            return (e - self._grid[0]) / self._sd
        x = np.interp(e, self._grid, self._scores)
        x += (np.maximum(e - self._grid[-1], 0) + np.minimum(e - self._grid[0], 0)) / self._sd
        return x

    def _statistics(self, rows: Rows) -> np.ndarray:
        x = self._x(rows.entropy)
        out = np.empty(len(x))
        up, down, k = self._up, self._down, self._k
        for i, v in enumerate(x.tolist()):
            up = max(0.0, up + v - k)
            down = max(0.0, down - v - k)
            out[i] = max(up, down)
        self._up, self._down = up, down
        self.frames += len(x)
        return out

    def trajectory_blocks(
        self, pool: Rows, index: np.ndarray, reference_frames: int | None = None
    ) -> Iterator[Block]:
        scores = self._x(pool.entropy)
        offsets = np.zeros(len(index))
        if reference_frames is not None:
            scores = scores - scores.mean()
            offsets = _reference_error(scores[:, None], len(index), reference_frames, index)[:, 0]
        # all streams at once (the loop over frames is Python), a span of frames at a time
        step = max(1, _CHUNK_CELLS // max(1, len(index)))
        up = np.zeros(len(index))
        down = np.zeros(len(index))
        k = self._k
        for start in range(0, index.shape[1], step):
            x = scores[index[:, start : start + step]] + offsets[:, None]  # R x span
            out = np.empty_like(x)
            for t in range(x.shape[1]):
                col = x[:, t]
                np.maximum(up + col - k, 0.0, out=up)
                np.maximum(down - col - k, 0.0, out=down)
                np.maximum(up, down, out=out[:, t])
            yield Block(0, start, out)


def _reference_error(
    centred: np.ndarray, runs: int, reference_frames: int, index: np.ndarray
) -> np.ndarray:
    """Per-run offsets distributed as the error of a mean over ``reference_frames`` frames."""
    rng = np.random.default_rng(int(index[0, 0]) + 7 * len(index))
    counts = rng.multinomial(reference_frames, np.full(len(centred), 1 / len(centred)), runs)
    return np.asarray(counts @ centred / reference_frames)


DETECTORS = ("embedding", "prediction", "uncertainty")


def build_detectors(
    reference: DriftReference,
    names: Sequence[str] = DETECTORS,
    *,
    embedding_window: int = 64,
    class_window: int = 200,
    cusum_k: float = 0.5,
) -> list[Detector]:
    """The named detectors on one reference, uncalibrated."""
    made: dict[str, Detector] = {}
    for name in names:
        if name == "embedding":
            made[name] = EmbeddingMMD(reference, embedding_window)
        elif name == "prediction":
            made[name] = ClassMixDrift(reference, class_window)
        elif name == "uncertainty":
            made[name] = EntropyCusum(reference, cusum_k)
        else:
            raise ValueError(f"unknown drift detector {name!r} (known: {', '.join(DETECTORS)})")
    return list(made.values())
