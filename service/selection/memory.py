"""A bounded memory of embedding rows: the latest frames asked for, in one model's space.

Shared by the embedding strategies (``coverage.EmbeddingSpace``) and the ``pal`` filter
(``filters.StreamFilters``): both count or cover the frames asked for, both forget the
oldest first, and both replace the whole memory when a new backbone re-embeds it.
"""

import numpy as np


class RowRing:
    """The latest ``capacity`` rows added, in one preallocated array.

    Adding a row copies it in (no view of its batch is kept alive) and overwrites the
    oldest once the ring is full; nothing is restacked. :attr:`rows` are in slot order,
    which is the order added until the ring wraps; :meth:`ordered` is always oldest first.

    Args:
        capacity: rows kept (at least 1).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a row memory needs at least one row, got {capacity}")
        self.capacity = int(capacity)
        self.clear()

    def clear(self) -> None:
        """Forgets every row (and the width: a new space may have another)."""
        self._slots: np.ndarray | None = None
        self._next = 0
        self.size = 0
        self.version = getattr(self, "version", 0) + 1  # bumped on every change

    def __len__(self) -> int:
        return self.size

    @property
    def dim(self) -> int:
        """Width of the rows; 0 before the first."""
        return 0 if self._slots is None else self._slots.shape[1]

    @property
    def rows(self) -> np.ndarray:
        """The rows kept, (size, dim), in slot order (not oldest first once wrapped)."""
        if self._slots is None:
            return np.empty((0, 0))
        return self._slots[: self.size]

    def ordered(self) -> np.ndarray:
        """The rows kept, oldest first."""
        if self._slots is None or self.size < self.capacity:
            return self.rows
        return np.roll(self._slots, -self._next, axis=0)  # the oldest is at the next slot

    def add(self, row: np.ndarray) -> None:
        """Keeps a copy of ``row``; the oldest is overwritten once the ring is full.

        Raises:
            ValueError: a row of another width than those kept.
        """
        row = np.asarray(row, dtype=np.float64).ravel()
        if self._slots is None:
            self._slots = np.zeros((self.capacity, len(row)))
        elif len(row) != self.dim:
            raise ValueError(f"a row of {len(row)} values in a memory of {self.dim}")
        self._slots[self._next] = row
        self._next = (self._next + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        self.version += 1

    def replace(self, rows: np.ndarray) -> None:
        """Holds the latest ``capacity`` of ``rows`` (oldest first) instead of what it held."""
        self.clear()
        for row in np.asarray(rows, dtype=np.float64)[-self.capacity :] if len(rows) else ():
            self.add(row)

    def resized(self, capacity: int) -> "RowRing":
        """A ring of ``capacity`` rows holding the latest of these, oldest first."""
        ring = RowRing(capacity)
        ring.replace(self.ordered())
        return ring
