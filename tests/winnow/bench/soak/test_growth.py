"""The soak's growth computation on synthetic samples: a seeded leak is caught, warm-up and
noise are not mistaken for one."""

import random

import numpy as np
import pytest

from winnow.bench.soak.growth import growth, kb_per_label, role_growth, verdict, warmup_seconds

HOUR_S = 3600.0


def _times(minutes: float = 60, every_s: float = 10) -> list[float]:
    return [float(t) for t in np.arange(0, minutes * 60 + every_s / 2, every_s)]


def _noise(count: int, mb: float = 2.0) -> np.ndarray:
    return np.random.default_rng(0).uniform(-mb, mb, count)


def test_a_seeded_leak_of_a_few_megabytes_an_hour_is_reported_as_growth() -> None:
    """Would catch a growth figure that misses a slow leak: 200 MB after warm-up, leaking
    20 MB an hour (10 % over the hour) under +-2 MB of noise, must fail the goal."""
    times = _times()
    rss = [200 + 20 * t / HOUR_S + n for t, n in zip(times, _noise(len(times)), strict=True)]

    found = role_growth(times, rss, warmup_seconds(HOUR_S))

    assert found["rss_goal_met"] is False
    assert found["rss_growth_after_warmup"] == pytest.approx(0.9 * 20 / 200, abs=0.02)
    assert found["rss_slope_mb_per_hour"] == pytest.approx(20, abs=2)


def test_warm_up_and_noise_are_not_a_leak() -> None:
    """Would catch warm-up counted as growth: RSS doubles in the first 5 minutes (caches,
    the first models), then holds at 200 MB +-2 MB; growth after warm-up must be ~0."""
    times = _times()
    rss = [
        (100 + 100 * t / 300 if t < 300 else 200) + n
        for t, n in zip(times, _noise(len(times)), strict=True)
    ]

    found = role_growth(times, rss, warmup_seconds(HOUR_S))

    assert found["rss_goal_met"] is True
    assert abs(found["rss_growth_after_warmup"]) < 0.02  # type: ignore[arg-type]
    assert growth(rss) > 0.9  # type: ignore[operator]  # the same samples with warm-up: doubled


def test_memory_kept_for_each_label_is_reported_per_label() -> None:
    """Would catch a per-label figure off the labels' pace: a trainer keeping 12 KB for
    each of 2 labels a second grows 84 MB over the hour after warm-up, 12 KB a label;
    a role that keeps nothing reads about 0; without new labels there is no figure."""
    times = _times()
    labels = [2.0 * t for t in times]
    rss = [800 + 12 * n / 1024 + e for n, e in zip(labels, _noise(len(times)), strict=True)]
    assert kb_per_label(times, rss, labels, warmup_seconds(HOUR_S)) == pytest.approx(12, abs=1)
    flat = [200 + e for e in _noise(len(times))]
    assert abs(kb_per_label(times, flat, labels, warmup_seconds(HOUR_S)) or 99) < 1
    assert kb_per_label(times, rss, [5.0] * len(times), warmup_seconds(HOUR_S)) is None


def test_one_spike_at_the_end_is_not_growth() -> None:
    """Would catch an end figure read from a single sample (a garbage collection's peak)."""
    assert growth([200, 200, 201, 200, 199, 200, 200, 260]) == pytest.approx(0, abs=0.01)


def test_warmup_is_a_tenth_at_least_two_minutes_at_most_half() -> None:
    assert warmup_seconds(HOUR_S) == 360
    assert warmup_seconds(600) == 120
    assert warmup_seconds(30) == 15


def test_the_verdict_fails_on_a_lost_frame_or_a_grown_role() -> None:
    """Would catch a verdict that passes a run with lost frames or a leaking role."""
    ok = verdict({"scorer": 0.01, "trainer": -0.02}, 0, HOUR_S)
    assert ok["result"] == "pass" and ok["frames_lost_zero"] and ok["rss_growth_under_goal"]
    lost = verdict({"scorer": 0.01}, 3, HOUR_S)
    assert lost["result"] == "fail" and lost["problems"] == ["3 frames lost"]
    grown = verdict({"scorer": 0.06, "trainer": 0.0}, 0, 600)
    assert grown["result"] == "fail" and "scorer" in grown["problems"][0]
    assert "over 60 minutes" in grown["note"]
    unknown = verdict({"scorer": None}, 0, 600)
    assert unknown["result"] == "fail" and not unknown["rss_growth_under_goal"]


def test_memory_that_swings_with_the_work_is_compared_by_its_level_at_each_end() -> None:
    """The failure it catches: a role whose RSS sits at a floor with spikes and no trend (as
    the scorer's does once freed memory goes back to the system: 240 MB, up to 450 during a
    drift calibration) judged by three samples that happened to be spikes at the end."""
    rng = random.Random(0)
    rss = [
        240.0 + (rng.uniform(60, 210) if rng.random() < 0.3 else rng.uniform(-3, 3))
        for _ in range(360)
    ]  # an hour of 10 s samples
    rss[-3:] = [440.0, 450.0, 420.0]
    times = [10.0 * i for i in range(len(rss))]
    found = role_growth(times, rss, 0)
    assert found["rss_goal_met"], found


def test_the_floor_follows_a_leak_but_not_memory_held_for_a_moment() -> None:
    """Would catch a floor figure that hides a leak, or one that moves with transients: a
    role at a 100 MB floor whose readings catch a 20 MB burst of work in 10 % of the
    samples at the start and 70 % at the end grows by the median (the goal's measure) but
    not by the floor; the same role leaking 10 MB over the hour grows by both alike."""
    rng = random.Random(1)
    times = _times(every_s=30)
    warmup = warmup_seconds(HOUR_S)

    def readings(leak_mb: float) -> list[float]:
        busy = [0.1 + 0.6 * t / HOUR_S for t in times]  # share of samples mid-burst
        return [
            100.0 + leak_mb * t / HOUR_S + (20.0 if rng.random() < b else 0.0)
            for t, b in zip(times, busy, strict=True)
        ]

    swinging = role_growth(times, readings(0.0), warmup)
    assert swinging["rss_growth_after_warmup"] == pytest.approx(0.2, abs=0.01)
    assert swinging["rss_floor_growth_after_warmup"] == pytest.approx(0.0, abs=1e-9)

    leaking = role_growth(times, readings(10.0), warmup)
    assert leaking["rss_floor_growth_after_warmup"] == pytest.approx(0.08, abs=0.02)
