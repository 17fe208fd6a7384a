"""Backpressure from the labeling queue: ask only for what the team can take.

The scorer's requests wait in the labeling queue until someone answers them.
When the team falls behind, more requests only make the queue older: by the
time a frame is labeled the model may have learned what it would teach. So the
scorer counts its requests and the answers to them (``LabelFeedback`` reports
each answer) and is *behind* when

- more than ``max_waiting`` requests wait unanswered, or
- the oldest unanswered request has waited more than ``max_wait_s``, or
- over the last ``window_s`` the answers are fewer than 80 % of the requests old enough
  to expect an answer (older than three mean answer lags, and a tenth of the window)
  (with at least 5 answers to judge by).

While behind, requests are allowed at the answer rate ``r_a`` (scaled down by
``max_waiting / waiting`` while the queue is over its limit, so it drains), through a
token bucket; and the policy's budget is scaled by ``allowed / demand`` (``demand``:
the budget times the frame rate) so the threshold rises and the frames still asked
for are the most informative ones at the time they can be labeled. When the team
keeps up again the allowed rate doubles every ``window_s`` (every tenth of it while no
request waits: the team is idle) until it meets the demand, and the throttle lifts.
At least one request per ``window_s`` is always allowed, so a team that comes back
finds something to answer.

Nothing is throttled until the first answer arrives: a deployment whose labels do
not come back on ``winnow.labels`` is not held back. Answers are matched to the
oldest waiting request (the queue is first in, first out); requests waiting longer
than ``4 · max_wait_s`` (or an hour, without a wait limit) count as abandoned.
O(1) amortised per request and answer; memory O(requests waiting + window).
"""

import math
import time
from collections import deque
from collections.abc import Callable

_BEHIND_RATIO = 0.8
_MIN_ANSWERS = 5
_ABANDON_FACTOR = 4.0
_ABANDON_DEFAULT_S = 3600.0
_IDLE_LIFT = 10.0


class Backpressure:
    """Counts requests and answers and throttles requests while the team is behind.

    Args:
        max_waiting: unanswered requests that count as behind; 0 for no limit.
        max_wait_s: a wait that counts as behind; 0 for no limit.
        window_s: seconds over which the rates are measured.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        max_waiting: int = 200,
        max_wait_s: float = 900.0,
        window_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_waiting < 0 or max_wait_s < 0 or window_s <= 0:
            raise ValueError("backpressure limits must be >= 0 and its window > 0")
        self.max_waiting = int(max_waiting)
        self.max_wait_s = float(max_wait_s)
        self.window_s = float(window_s)
        self._clock = clock
        self._waiting: deque[float] = deque()  # request times, oldest first
        self._requests: deque[float] = deque()  # request times within the window
        self._answers: deque[float] = deque()  # answer times within the window
        self._lag: float | None = None  # running mean of the answer lag (FIFO-matched)
        self._frames: deque[tuple[float, int]] = deque()  # (time, frames) within the window
        self._frame_count = 0
        self._first_frame: float | None = None
        self.engaged = False
        self.allowed_rate: float | None = None  # requests per second; None: not throttled
        self._tokens = 1.0
        self._last = clock()
        self.held_back = 0
        self.factor = 1.0

    @property
    def enabled(self) -> bool:
        return self.max_waiting > 0 or self.max_wait_s > 0

    @property
    def throttled(self) -> bool:
        return self.allowed_rate is not None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def now(self) -> float:
        return self._clock()

    def requested(self, now: float | None = None) -> None:
        """One request sent."""
        now = self._clock() if now is None else now
        self._waiting.append(now)
        self._requests.append(now)
        if self.allowed_rate is not None:
            self._tokens -= 1.0

    def answered(self, now: float | None = None) -> None:
        """One answer (labeled or unlabelable) to one of this scorer's requests."""
        now = self._clock() if now is None else now
        self.engaged = True
        if self._waiting:
            lag = now - self._waiting.popleft()
            self._lag = lag if self._lag is None else 0.9 * self._lag + 0.1 * lag
        self._answers.append(now)

    def grace(self) -> float:
        """How old a request must be before the rate test expects its answer.

        Answers trail requests by the labeling lag, so right after a burst of
        requests the answers always look too few: without a grace the scorer
        would throttle itself at start. Three mean lags, and at least a tenth
        of the window.
        """
        lag = self._lag or 0.0
        return max(3.0 * lag, self.window_s / 10.0)

    def frames(self, now: float, count: int) -> None:
        """``count`` frames decided at ``now`` (for the frame rate behind the demand)."""
        if self._first_frame is None:
            self._first_frame = now
        self._frames.append((now, count))
        self._frame_count += count

    def demand(self, now: float, budget: float) -> float:
        """Requests per second the budget asks for at the recent frame rate."""
        self._expire(now)
        if self._first_frame is None:
            return 0.0
        span = min(self.window_s, max(now - self._first_frame, 1.0))
        return budget * self._frame_count / span

    def rates(self, now: float) -> tuple[float, float]:
        """(requests, answers) per second over the window."""
        self._expire(now)
        return len(self._requests) / self.window_s, len(self._answers) / self.window_s

    def oldest_wait(self, now: float) -> float | None:
        self._expire(now)
        return now - self._waiting[0] if self._waiting else None

    def behind(self, now: float) -> bool:
        """Whether the team is behind (see the module docstring)."""
        if not (self.enabled and self.engaged):
            return False
        self._expire(now)
        if self.max_waiting and self.waiting > self.max_waiting:
            return True
        oldest = self.oldest_wait(now)
        if self.max_wait_s and oldest is not None and oldest > self.max_wait_s:
            return True
        answered = len(self._answers)
        cutoff = now - self.grace()
        due = sum(1 for moment in self._requests if moment <= cutoff)
        return answered >= _MIN_ANSWERS and len(self._answers) < _BEHIND_RATIO * due

    def update(self, now: float, budget: float) -> float:
        """Re-judges the state; returns the share of the budget in force (1: no throttle).

        Args:
            now: the clock.
            budget: the policy's budget (a fraction of frames): with the frame rate, the
                requests per second it would make unthrottled (the demand).
        """
        demand = self.demand(now, budget)
        elapsed = max(0.0, now - self._last)
        self._last = now
        floor = 1.0 / self.window_s
        if self.behind(now):
            _, answers = self.rates(now)
            rate = answers
            if self.max_waiting and self.waiting > self.max_waiting:
                rate *= self.max_waiting / self.waiting  # below the answer rate: the queue drains
            if self.allowed_rate is None:
                self._tokens = min(self._tokens, 1.0)
            self.allowed_rate = max(rate, floor)
        elif self.allowed_rate is not None:
            # an idle team (nothing waits) takes more at once: the throttle lifts ten
            # times as fast then, so labelers do not wait out windows for work
            period = self.window_s if self._waiting else self.window_s / _IDLE_LIFT
            self.allowed_rate *= math.pow(2.0, elapsed / period)
            if demand <= 0 or self.allowed_rate >= demand:
                self.allowed_rate = None
        if self.allowed_rate is None:
            self.factor = 1.0
            return 1.0
        capacity = max(1.0, self.allowed_rate * self.window_s / 10.0)
        self._tokens = min(capacity, self._tokens + elapsed * self.allowed_rate)
        self.factor = 1.0 if demand <= 0 else min(1.0, self.allowed_rate / demand)
        return self.factor

    def allows(self) -> bool:
        """Whether one more request may go now (a token is there, or no throttle)."""
        return self.allowed_rate is None or self._tokens >= 1.0

    def hold(self) -> None:
        """Counts a selection the backpressure refused."""
        self.held_back += 1

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        for times in (self._requests, self._answers):
            while times and times[0] <= horizon:
                times.popleft()
        while self._frames and self._frames[0][0] <= horizon:
            self._frame_count -= self._frames.popleft()[1]
        limit = self.max_wait_s * _ABANDON_FACTOR if self.max_wait_s else _ABANDON_DEFAULT_S
        while self._waiting and now - self._waiting[0] > limit:
            self._waiting.popleft()
