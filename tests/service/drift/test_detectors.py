"""The detectors: calibrated false-alarm rate, and alarms on each kind of shift."""

import tracemalloc

import numpy as np
import pytest

from schemas.drift import DriftReference
from service.config import DriftSettings
from service.drift import Rows, Simulation, build_detectors, calibrate, threshold_for_ert
from service.drift.calibrate import FirstAlarms, calibrated
from tests.service.drift.synthetic import outputs

ERT = 300


def _calibrated(reference: DriftReference, name: str):
    (detector,) = build_detectors(reference, [name], embedding_window=32, class_window=100)
    calibrate(
        detector,
        Rows.reference_pool(reference),
        ERT,
        seed=1,
        cells=300_000,
        reference_frames=reference.frames,
    )
    return detector


@pytest.mark.parametrize("name", ["embedding", "prediction", "uncertainty"])
def test_on_reference_data_false_alarms_come_about_every_ert_frames(reference, name) -> None:
    detector = _calibrated(reference, name)
    rng = np.random.default_rng(5)
    rows = Rows.from_outputs(reference, *outputs(20_000, rng))  # fresh frames, not the pool
    runs = detector.trajectories(rows, rng.integers(len(rows), size=(200, 6 * ERT)))
    first = (np.maximum.accumulate(runs, axis=1) <= detector.threshold).sum(axis=1)
    # 200 runs: the mean of a roughly exponential run length is within ~15 % of its
    # expectation; the generous band also covers the reference's own sampling error
    assert 0.5 * ERT < first.mean() < 2.0 * ERT


SHIFTS = {
    "embedding": {"shift": 1.0},
    "prediction": {"mix": np.array([0.6, 0.1, 0.1, 0.1, 0.1])},
    "uncertainty": {"sharpness": 1.0},
}


@pytest.mark.parametrize("name", ["embedding", "prediction", "uncertainty"])
def test_each_shift_is_detected_within_a_fraction_of_the_ert(reference, name) -> None:
    detector = _calibrated(reference, name)
    detected = 0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        stream = Rows.from_outputs(reference, *outputs(ERT, rng, **SHIFTS[name]))
        fresh = detector.fresh()
        alarms = [
            a
            for start in range(0, ERT, 32)
            for a in fresh.update(stream.take(slice(start, start + 32)))
        ]
        detected += bool(alarms)
    assert detected >= 18


def test_no_shift_no_alarm_in_a_short_stream(reference) -> None:
    detector = _calibrated(reference, "embedding")
    rng = np.random.default_rng(7)
    quiet = sum(
        not detector.fresh().update(Rows.from_outputs(reference, *outputs(60, rng)))
        for _ in range(50)
    )
    assert quiet >= 45


def test_streaming_updates_match_the_vectorized_trajectories(reference) -> None:
    rng = np.random.default_rng(3)
    rows = Rows.from_outputs(reference, *outputs(900, rng))
    for detector in build_detectors(reference, embedding_window=16, class_window=40):
        expected = detector.trajectories(rows, np.arange(len(rows))[None])[0]
        live = detector.fresh()
        got = np.concatenate(
            [live._statistics(rows.take(slice(s, s + 23))) for s in range(0, len(rows), 23)]
        )
        np.testing.assert_allclose(
            np.where(np.isfinite(got), got, 0),
            np.where(np.isfinite(expected), expected, 0),
            rtol=1e-4,
            atol=1e-6,
        )


def test_an_alarm_resets_the_detector_so_its_window_refills(reference) -> None:
    detector = _calibrated(reference, "embedding")
    rows = Rows.from_outputs(reference, *outputs(200, np.random.default_rng(1), shift=3.0))
    alarms = detector.fresh().update(rows)
    gaps = np.diff([0, *[i + 1 for i, _ in alarms]])
    assert len(alarms) >= 2 and (gaps >= detector.window).all()


def test_threshold_for_ert_orders_thresholds_by_ert() -> None:
    rng = np.random.default_rng(0)
    trajectories = rng.normal(size=(400, 3000))
    low, high = threshold_for_ert(trajectories, 50), threshold_for_ert(trajectories, 500)
    assert low < high
    first = (np.maximum.accumulate(trajectories, axis=1) <= high).sum(axis=1)
    assert 400 < first.mean() < 600


def test_first_alarms_match_a_direct_scan_of_the_trajectories() -> None:
    rng = np.random.default_rng(2)
    trajectories = rng.normal(size=(50, 400)).cumsum(axis=1) / 10
    trajectories[:, :5] = -np.inf  # a window still filling
    first = FirstAlarms(trajectories, fill=6)
    for h in (-1.0, 0.0, 0.5, 2.0, 50.0):
        direct = (np.maximum.accumulate(trajectories, axis=1) <= h).sum(axis=1)
        np.testing.assert_array_equal(first.at(h), direct)


def test_mean_run_follows_the_slow_streams_that_outlast_the_simulation() -> None:
    # half the streams alarm every 200 frames, half every 5000: the mean run is 2600,
    # but one rate for all would say about 780 from streams cut at 3000 frames
    rng = np.random.default_rng(4)
    rates = np.repeat([1 / 200, 1 / 5000], 2000)
    runs = rng.geometric(rates) - 1
    length = 3000
    estimate = FirstAlarms(np.zeros((1, length))).mean_run(np.minimum(runs, length), fill=1)
    assert 0.85 * 2600 < estimate < 1.15 * 2600


def test_detectors_calibrated_together_share_one_false_alarm_rate(reference) -> None:
    detectors = build_detectors(reference, embedding_window=32, class_window=100)
    pool = Rows.reference_pool(reference)
    alone = [d.fresh() for d in detectors]
    for d in alone:
        calibrate(d, pool, ERT, seed=1, cells=300_000, reference_frames=reference.frames)
    together = Simulation(
        detectors, pool, ERT, seed=1, cells=300_000, reference_frames=reference.frames
    )
    together.apply(together.together(ERT))
    # each alone would alarm every ERT frames; together each must alarm less often
    assert all(t.threshold > a.threshold for t, a in zip(detectors, alone, strict=True))
    rng = np.random.default_rng(6)
    rows = Rows.from_outputs(reference, *outputs(20_000, rng))
    index = rng.integers(len(rows), size=(200, 6 * ERT))
    first = np.min(
        [
            (np.maximum.accumulate(d.trajectories(rows, index), axis=1) <= d.threshold).sum(1)
            for d in detectors
        ],
        axis=0,
    )
    assert 0.5 * ERT < first.mean() < 2.0 * ERT


def test_the_cusum_sees_skewed_undrifted_entropy_as_standard_normal_scores(reference) -> None:
    # entropy as a confident model gives it: most frames near 0, a long tail towards 1
    rng = np.random.default_rng(8)
    sample = rng.beta(0.3, 3.0, size=400)
    skewed = reference.model_copy(
        update={
            "sample_entropy": sample.tolist(),
            "entropy_mean": float(sample.mean()),
            "entropy_std": float(sample.std()),
        }
    )
    (cusum,) = build_detectors(skewed, ["uncertainty"])
    stream = rng.beta(0.3, 3.0, size=20_000)
    standardized = (stream - stream.mean()) / stream.std()
    assert float(np.mean(standardized**3)) > 1.5  # the skew the scores take away
    x = cusum._x(stream)
    assert abs(x.mean()) < 0.15 and abs(x.std() - 1) < 0.15
    assert abs(float(np.mean(x**3))) < 0.3
    # beyond the reference's largest entropy, a frame scores by its distance in std units
    top, sd = sample.max(), sample.std()
    far, edge = cusum._x(np.array([top + 3 * sd, top]))
    assert far == pytest.approx(edge + 3) and edge > 2


def test_a_head_recalibration_at_default_settings_keeps_its_arrays_small(reference) -> None:
    """The scorer recalibrates the head detectors every ``head_rearm_frames`` frames while
    heads come in, so their calibration's arrays are the scorer's memory swing: in a soak
    the scorer spent half its samples inside one, 38 MB higher. Fails if the simulation
    holds every stream's statistics (R x L float64, 11.5 MB, and their running maximum) or
    the bootstrap index as int64 (38 MiB at the peak) or int32 (15.4 MiB with the blocks
    of 250,000 floats of before, 7.7 with today's), or works in blocks as large as that
    (12.6 MiB) or larger (156 MiB at 4,000,000 floats), or holds an R x L x classes array
    whole. Today: 5.0 MiB, 2.9 of them the index."""
    settings = DriftSettings()  # ERT 10,000: 48 streams of 30,000 frames
    tracemalloc.start()
    try:
        detectors, _ = calibrated(reference, settings, ["prediction", "uncertainty"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [d.name for d in detectors] == ["prediction", "uncertainty"]
    # the uint16 index (2.9 MB) and a block's arrays, never a whole R x L array
    assert peak < 7 * 2**20, f"{peak / 2**20:.1f} MiB"


def test_a_backbone_recalibration_keeps_the_embedding_arrays_small(reference) -> None:
    """A new backbone recalibrates the embedding detector: 48 streams of 30,000 frames, each
    frame 64 Fourier features. Fails if a block holds a whole stream's features (30,000 x 64
    float64, several copies: 96 MiB at the peak here) instead of a slice of the features,
    if the simulation holds every stream's statistics at once (37 MiB), or if the blocks
    or the index grow back to their former size (250,000 floats: 7.9 MiB; an int32 index:
    7.4; both: 14.1). Today: 4.7 MiB."""
    settings = DriftSettings()
    tracemalloc.start()
    try:
        detectors, _ = calibrated(reference, settings, ["embedding"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [d.name for d in detectors] == ["embedding"]
    assert peak < 7 * 2**20, f"{peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("name", ["embedding", "prediction", "uncertainty"])
def test_first_alarms_from_blocks_equal_them_from_the_whole_array(
    reference, name, monkeypatch
) -> None:
    """Calibration reads the first alarms off the statistics a block at a time: blocks of
    streams (windowed detectors) or spans of frames (the CUSUM). Fails if a block's records
    lose the running maximum reached before it (a span would restart each stream's
    maximum), or if records end up out of stream or time order."""
    monkeypatch.setattr("service.drift.detectors._CHUNK_CELLS", 700)  # many small blocks
    (detector,) = build_detectors(reference, [name], embedding_window=16, class_window=40)
    pool = Rows.reference_pool(reference)
    index = np.random.default_rng(3).integers(len(pool), size=(7, 500))
    blocks = list(detector.trajectory_blocks(pool, index, reference.frames))
    assert len(blocks) > 3
    whole = FirstAlarms(detector.trajectories(pool, index, reference.frames), detector.fill)
    parts = FirstAlarms.from_blocks(iter(blocks), index.shape, detector.fill)
    for h in np.quantile(whole._value[np.isfinite(whole._value)], [0.1, 0.5, 0.9, 0.99]):
        np.testing.assert_array_equal(parts.at(h), whole.at(h))
    assert parts.threshold(200) == whole.threshold(200)


@pytest.mark.parametrize("name", ["embedding", "prediction"])
def test_trajectories_in_slices_of_features_equal_them_whole(reference, name, monkeypatch) -> None:
    """The window statistics are sums over features, so a block may take a few features at a
    time. Fails if a slice's part is computed against the wrong features' reference (mean or
    class probabilities) or the parts are not added up."""
    (detector,) = build_detectors(reference, [name], embedding_window=16, class_window=40)
    pool = Rows.reference_pool(reference)
    index = np.random.default_rng(5).integers(len(pool), size=(6, 400))
    whole = detector.trajectories(pool, index, reference.frames)
    monkeypatch.setattr("service.drift.detectors._CHUNK_CELLS", 400 * 3)  # 3 features a block
    sliced = detector.trajectories(pool, index, reference.frames)
    finite = np.isfinite(whole)
    assert (np.isfinite(sliced) == finite).all()
    np.testing.assert_allclose(sliced[finite], whole[finite], rtol=1e-9, atol=1e-12)
