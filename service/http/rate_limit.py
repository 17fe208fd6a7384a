"""Per-token rate limits of HTTP ingest: a token bucket per bearer token."""

import time
from collections.abc import Callable


class TokenBuckets:
    """A token bucket per bearer token: ``rate`` frames per second, up to ``burst`` at once.

    A request is admitted while its bucket holds at least one frame's worth;
    its frames are then charged in full, which may leave the bucket in debt,
    so a large multipart request is never refused for its size alone but
    delays the next ones.
    """

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # token -> (level, at)

    def admit(self, key: str) -> float:
        """Takes one frame's worth; returns 0, or the seconds to wait before retrying."""
        if self.rate <= 0:
            return 0.0
        level = self._level(key)
        if level < 1:
            return (1 - level) / self.rate
        self._buckets[key] = (level - 1, self.clock())
        return 0.0

    def charge(self, key: str, frames: int) -> None:
        """Takes ``frames`` more (after :meth:`admit` took the first)."""
        if self.rate > 0 and frames > 0:
            self._buckets[key] = (self._level(key) - frames, self.clock())

    def _level(self, key: str) -> float:
        now = self.clock()
        level, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, level + (now - at) * self.rate)


__all__ = ["TokenBuckets"]
