"""Hard budget limits of the query policy: a sliding frame window and a labels-per-hour cap.

Both are exact counters, not estimates: whatever a strategy wants, a frame is
selected only if :meth:`SlidingBudget.allows` and :meth:`HourlyCap.allows` say
so, which is what makes the design's promise "over any window the fraction of
frames sent for labeling stays within the budget" hold.
"""

import math
import time
from collections import deque
from collections.abc import Callable

_EPS = 1e-9  # keeps floor(0.29 * 100) at 29 although 0.29 * 100 == 28.999999999999996
_HOUR_S = 3600.0


def selection_limit(budget: float, window: int) -> int:
    """The most selections allowed in ``window`` consecutive decisions: ``floor(budget * window)``.

    Raises:
        ValueError: if the budget or window is out of range, or the limit is 0
            (a budget that could never select anything).
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    if window < 1 or int(window) != window:
        raise ValueError(f"window must be a positive integer, got {window}")
    limit = math.floor(budget * window + _EPS)
    if limit < 1:
        raise ValueError(
            f"budget {budget} over a window of {window} frames allows no selection at all; "
            f"budget * window must be at least 1"
        )
    return limit


class SlidingBudget:
    """Exact count of selections over the last ``window`` decisions (a ring buffer).

    A selection is allowed only if, counting it, the last ``window`` decisions
    hold at most ``floor(budget * window)`` selections, so the selected fraction
    over any ``window`` consecutive frames never exceeds ``budget``. Until the
    window has filled, the limit grows with the frames seen
    (``max(1, floor(budget * seen))``), so a fresh stream does not spend a whole
    window's budget on its first frames. O(1) per frame.
    """

    def __init__(self, budget: float, window: int) -> None:
        self._limit = selection_limit(budget, window)
        self.budget = float(budget)
        self.window = int(window)
        self._ring = [False] * self.window
        self._next = 0  # the slot the next decision goes to (the oldest one once full)
        self._filled = 0
        self._count = 0

    @property
    def limit(self) -> int:
        """Selections allowed per window."""
        return self._limit

    @property
    def selected_in_window(self) -> int:
        return self._count

    @property
    def used_ratio(self) -> float:
        """Selections in the window divided by the window length."""
        return self._count / self.window

    def allows(self) -> bool:
        """Whether selecting the next frame keeps the window within the budget."""
        if self._filled < self.window:
            early = max(1, math.floor(self.budget * (self._filled + 1) + _EPS))
            return self._count + 1 <= min(early, self._limit)
        return self._count - self._ring[self._next] + 1 <= self._limit

    def record(self, selected: bool) -> None:
        """Records the decision on one frame (selected or not)."""
        index = self._next
        if self._filled == self.window:
            self._count -= self._ring[index]
        else:
            self._filled += 1
        self._ring[index] = selected
        self._count += selected
        index += 1
        self._next = 0 if index == self.window else index

    def resize(self, budget: float, window: int) -> None:
        """Changes budget and window, keeping the most recent decisions.

        A smaller limit than the selections already in the window blocks new
        selections until enough of them have slid out.
        """
        limit = selection_limit(budget, window)
        recent = self._recent()[-int(window) :]
        self._limit, self.budget, self.window = limit, float(budget), int(window)
        self._ring = recent + [False] * (self.window - len(recent))
        self._filled = len(recent)
        self._next = self._filled % self.window
        self._count = sum(recent)

    def _recent(self) -> list[bool]:
        """The decisions in the window, oldest first."""
        if self._filled < self.window:
            return self._ring[: self._filled]
        return self._ring[self._next :] + self._ring[: self._next]


class HourlyCap:
    """At most ``labels_per_hour`` selections in any 3600 s (sliding, exact).

    ``None`` or 0 means no cap. Selection times sit in a deque; each is
    appended once and dropped once, so the work is O(1) amortized per frame.

    Args:
        labels_per_hour: the cap (its floor is used), or None / 0 for none.
        clock: seconds, monotonic; tests pass a fake one.
    """

    def __init__(
        self, labels_per_hour: float | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._times: deque[float] = deque()
        self._cap: int | None = None
        self.labels_per_hour: float | None = None
        self.set_rate(labels_per_hour)

    def set_rate(self, labels_per_hour: float | None) -> None:
        """Changes the cap (None or 0 removes it); the selection history is kept."""
        self._cap = self.validate(labels_per_hour)
        self.labels_per_hour = None if self._cap is None else float(labels_per_hour or 0)

    @staticmethod
    def validate(labels_per_hour: float | None) -> int | None:
        """The integer cap for a rate, None for no cap.

        Raises:
            ValueError: for a negative rate, or one between 0 and 1 (it would
                allow nothing).
        """
        if labels_per_hour is None or labels_per_hour == 0:
            return None
        if labels_per_hour < 1:
            raise ValueError(
                f"labels_per_hour must be 0 (no cap) or at least 1, got {labels_per_hour}"
            )
        return math.floor(labels_per_hour + _EPS)

    def now(self) -> float:
        return self._clock()

    def allows(self, now: float | None = None) -> bool:
        """Whether one more selection now keeps the last hour within the cap."""
        if self._cap is None:
            return True
        self._expire(self._clock() if now is None else now)
        return len(self._times) < self._cap

    def record(self, now: float | None = None) -> None:
        """Records one selection (call it only for selected frames)."""
        now = self._clock() if now is None else now
        self._expire(now)
        self._times.append(now)

    @property
    def count_last_hour(self) -> int:
        """Selections in the last 3600 s."""
        self._expire(self._clock())
        return len(self._times)

    def _expire(self, now: float) -> None:
        horizon = now - _HOUR_S
        times = self._times
        while times and times[0] <= horizon:
            times.popleft()
