"""Labeling-queue backpressure: ask at the rate the team answers, raise the bar, recover."""

from collections import deque

import numpy as np
import pytest

from service.config import PolicySettings
from service.selection.backpressure import Backpressure
from service.selection.policy import QueryPolicy

FPS = 20  # frames a second, one batch a second
BUDGET = 0.05  # one request a second when nobody is behind


class _Team:
    """Answers the oldest waiting request at a given rate (first in, first out)."""

    def __init__(self, policy: QueryPolicy) -> None:
        self.policy = policy
        self.queue: deque[float] = deque()
        self._credit = 0.0

    def work(self, seconds: float, rate: float) -> None:
        self._credit += seconds * rate
        while self._credit >= 1 and self.queue:
            self._credit -= 1
            self.queue.popleft()
            self.policy.on_answer("cat", "cat")
        self._credit = min(self._credit, 1.0)  # an idle team does not bank time


def _run(
    policy: QueryPolicy, team: _Team, now: list[float], seconds: int, rate: float, rng
) -> tuple[list[float], list[float]]:
    """Streams ``seconds`` of frames; returns the request times and the utilities asked for."""
    times, utilities = [], []
    for _ in range(seconds):
        now[0] += 1.0
        values = rng.random(FPS)
        rows = policy.decide({"entropy": values})
        for value, row in zip(values, rows, strict=True):
            if row["selected"]:
                team.queue.append(now[0])
                times.append(now[0])
                utilities.append(float(value))
        team.work(1.0, rate)
    return times, utilities


def test_requests_follow_the_answer_rate_with_a_higher_bar_and_recover() -> None:
    now = [0.0]
    settings = PolicySettings(
        name="quantile",
        utility="entropy",
        budget=BUDGET,
        window=2000,
        seed=0,
        backpressure_waiting=40,
        backpressure_wait_s=120.0,
        backpressure_window_s=120.0,
    )
    policy = QueryPolicy.from_settings(settings, clock=lambda: now[0])
    team, rng = _Team(policy), np.random.default_rng(0)

    slow_times, slow_utilities = _run(policy, team, now, 1800, 0.2, rng)
    late = [t for t in slow_times if t > 900]
    assert len(late) / 900 < 0.3  # asked at about the 0.2/s the team answers, not 1/s
    assert len(team.queue) <= 60  # the queue stays short instead of growing by 0.8/s
    state = policy.state().backpressure
    assert state is not None and state.throttled and state.held_back > 0
    assert state.budget_factor < 0.5 and state.answer_rate_per_hour == pytest.approx(720, rel=0.5)

    fast_times, fast_utilities = _run(policy, team, now, 1800, 5.0, rng)
    recovered = [t for t in fast_times if t > now[0] - 600]
    assert len(recovered) / 600 > 0.8  # back to about the budget's 1/s
    assert not policy.state().backpressure.throttled  # type: ignore[union-attr]
    # while throttled only the most informative frames were asked for
    assert np.mean(slow_utilities[len(slow_utilities) // 2 :]) > np.mean(fast_utilities) + 0.03


def test_nothing_is_held_back_before_the_team_answers_at_all() -> None:
    """A deployment whose labels come back some other way is never throttled."""
    now = [0.0]
    pressure = Backpressure(max_waiting=5, max_wait_s=10.0, window_s=60.0, clock=lambda: now[0])
    policy = QueryPolicy("quantile", budget=BUDGET, window=2000, seed=0, backpressure=pressure)
    rng = np.random.default_rng(1)
    selected = 0
    for _ in range(600):
        now[0] += 1.0
        selected += sum(row["selected"] for row in policy.decide({"entropy": rng.random(FPS)}))
    assert selected / 600 == pytest.approx(1.0, rel=0.2)
    assert pressure.waiting > 5 and not pressure.engaged and not pressure.throttled


def test_settings_can_turn_backpressure_off() -> None:
    settings = PolicySettings(backpressure_waiting=0, backpressure_wait_s=0)
    policy = QueryPolicy.from_settings(settings)
    assert policy.backpressure is None and policy.state().backpressure is None


def test_answers_that_trail_a_burst_of_requests_do_not_throttle() -> None:
    """Catches the start-up stall: 10 requests, 7 answered a moment later, is not 'behind'."""
    now = [0.0]
    pressure = Backpressure(max_waiting=200, max_wait_s=900, window_s=600, clock=lambda: now[0])
    for _ in range(10):
        pressure.frames(now[0], 10)
        pressure.requested(now[0])
    now[0] = 1.0
    for _ in range(7):
        pressure.answered(now[0])
    assert pressure.update(now[0], budget=0.1) == 1.0 and pressure.allows()
    assert not pressure.throttled
    # The same shortfall, once the requests are well past the grace, is behind.
    now[0] = 200.0
    assert pressure.behind(now[0])


def test_an_idle_team_gets_work_again_within_minutes() -> None:
    """Catches the slow lift: with the throttle doubling once per 10-minute window, a team
    that had been slow and then kept up got the budget's rate back after 16 minutes in
    this stream (3 with the idle lift); in a 60-minute soak the requests grew from about
    3 to about 100 a minute over 40 minutes while the team could take 120."""
    now = [0.0]
    settings = PolicySettings(name="quantile", utility="entropy", budget=BUDGET, window=2000)
    policy = QueryPolicy.from_settings(
        settings.model_copy(update={"seed": 0}), clock=lambda: now[0]
    )
    team, rng = _Team(policy), np.random.default_rng(2)
    _run(policy, team, now, 1800, 0.2, rng)  # slow: throttled to about 0.2 requests a second
    assert policy.state().backpressure.throttled  # type: ignore[union-attr]
    fast_times, _ = _run(policy, team, now, 600, 5.0, rng)  # then fast: the queue empties
    late = [t for t in fast_times if t > now[0] - 300]
    assert len(late) / 300 > 0.8  # back to about the budget's 1/s within 5 of 10 minutes
    assert not policy.state().backpressure.throttled  # type: ignore[union-attr]
