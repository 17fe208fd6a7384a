"""The hard budget limits: an exact sliding window and an hourly cap."""

import numpy as np
import pytest

from service.selection.budget import HourlyCap, SlidingBudget, selection_limit


def _greedy(budget: SlidingBudget, wants: np.ndarray) -> np.ndarray:
    """Selects every frame that is wanted and allowed; returns what was selected."""
    out = np.zeros(len(wants), dtype=bool)
    for i, want in enumerate(wants.tolist()):
        out[i] = want and budget.allows()
        budget.record(bool(out[i]))
    return out


def _max_in_any_window(selected: np.ndarray, window: int) -> int:
    return int(np.convolve(selected.astype(int), np.ones(window, dtype=int), "valid").max())


def test_a_greedy_stream_never_exceeds_the_budget_in_any_window() -> None:
    budget = SlidingBudget(0.05, 200)
    selected = _greedy(budget, np.ones(5000, dtype=bool))
    assert _max_in_any_window(selected, 200) == 10
    assert selected.sum() == pytest.approx(0.05 * 5000, rel=0.01)  # and it does spend it
    assert budget.used_ratio == pytest.approx(0.05)


def test_random_wants_respect_every_window() -> None:
    wants = np.random.default_rng(0).random(20_000) < 0.3
    selected = _greedy(SlidingBudget(0.1, 100), wants)
    assert _max_in_any_window(selected, 100) <= 10
    assert not selected[~wants].any()


def test_floor_of_budget_times_window_is_robust_to_float_error() -> None:
    assert 0.29 * 100 < 29  # 28.999999999999996
    assert selection_limit(0.29, 100) == 29
    with pytest.raises(ValueError, match="no selection"):
        SlidingBudget(0.0005, 1000)


def test_resize_keeps_history_and_blocks_until_it_slides_out() -> None:
    budget = SlidingBudget(0.5, 10)
    before = _greedy(budget, np.ones(10, dtype=bool))
    assert budget.selected_in_window == 5
    budget.resize(0.2, 10)  # limit 2, but 5 selections are still in the window
    assert not budget.allows()
    selected = _greedy(budget, np.ones(30, dtype=bool))
    history = np.concatenate([before, selected])
    # greedy and exact: a frame is passed over only when taking it would break the new limit
    for i, taken in enumerate(selected.tolist(), start=len(before)):
        window_before = int(history[max(0, i - 9) : i].sum())
        assert taken == (window_before + 1 <= 2), i
    assert _max_in_any_window(history[10:], 10) <= 2
    budget.resize(0.5, 4)  # a shorter window keeps only its most recent decisions
    assert budget.window == 4 and budget.selected_in_window == int(history[-4:].sum())


def test_a_fresh_stream_spends_its_budget_gradually() -> None:
    budget = SlidingBudget(0.05, 1000)
    selected = _greedy(budget, np.ones(400, dtype=bool))
    for seen in range(1, 401):
        assert selected[:seen].sum() <= max(1, int(0.05 * seen)), seen
    assert selected.sum() == 20


def test_hourly_cap_is_never_exceeded_with_a_fake_clock() -> None:
    now = [0.0]
    cap = HourlyCap(30, clock=lambda: now[0])
    times = []
    rng = np.random.default_rng(1)
    for _ in range(20_000):
        now[0] += float(rng.exponential(1.5))  # ~2400 frames an hour, all wanted
        if cap.allows():
            cap.record()
            times.append(now[0])
    times_array = np.array(times)
    # every half-open hour (t - 3600, t] ending at a selection holds at most 30
    counts = np.searchsorted(times_array, times_array, side="right") - np.searchsorted(
        times_array, times_array - 3600.0, side="right"
    )
    assert counts.max() == 30
    hours = now[0] / 3600
    assert len(times) >= 30 * (hours - 1)  # it does spend the cap
    assert cap.count_last_hour <= 30


def test_cap_removal_and_bad_rates() -> None:
    now = [0.0]
    cap = HourlyCap(2, clock=lambda: now[0])
    for _ in range(2):
        cap.record()
    assert not cap.allows()
    now[0] = 3600.0  # exactly one hour later the first two slide out
    assert cap.allows() and cap.count_last_hour == 0
    cap.record()
    cap.record()
    cap.set_rate(0)
    assert cap.allows() and cap.labels_per_hour is None
    assert cap.count_last_hour == 2  # history kept while uncapped
    with pytest.raises(ValueError, match="at least 1"):
        cap.set_rate(0.5)
    assert HourlyCap(None).allows()
