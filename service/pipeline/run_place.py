"""Where a batch's model run goes: on the event loop for a model that runs in a blink,
in the infer pool otherwise.

Handing a run to the pool costs a thread wake-up, a return through the event loop and the
interpreter lock traded with the loop while the run's Python parts execute. For a small
model on small batches that is a good part of the run: the digits scorer at batch 16
spent 0.192-0.201 ms of CPU a frame with its runs in the pool (537ee10) and 0.170-0.187
with them on the loop, where a batch's run takes about 0.6 ms (``winnow bench throughput
--cases digits --batch-sizes 16,64``, 3 runs each, interleaved). At batch 64 a run takes
3.5 ms and stays in the pool. A camera model's run takes tens of milliseconds and must
not hold the loop: it stays in the pool.
"""

INLINE_RUN_S = 0.002
"""A batch whose run is expected to take less than this (wall time) runs on the event loop."""

SMOOTHING = 0.2
"""The weight of the newest run in the smoothed time a row."""


class RunPlace:
    """A smoothed estimate of the current model's run time a row, and the choice it gives.

    A model's first run goes to the pool (nothing is known of it yet); each run, wherever
    it ran, updates the estimate, so a model that slows down (larger batches, AIFT's views
    in the same run, a busier machine) goes back to the pool. A new model starts over.

    Args:
        limit_s: the longest expected run that goes on the loop.
    """

    def __init__(self, limit_s: float = INLINE_RUN_S) -> None:
        self.limit_s = limit_s
        self._model: object | None = None
        self._per_row: float | None = None

    def inline(self, model: object, rows: int) -> bool:
        """Whether ``rows`` rows of ``model`` are expected to run within :attr:`limit_s`."""
        if model is not self._model or self._per_row is None:
            return False
        return self._per_row * rows < self.limit_s

    def observe(self, model: object, rows: int, seconds: float) -> None:
        """A run of ``rows`` rows of ``model`` took ``seconds`` of wall time."""
        per_row = seconds / max(1, rows)
        if model is not self._model or self._per_row is None:
            self._model, self._per_row = model, per_row
        else:
            self._per_row += SMOOTHING * (per_row - self._per_row)
