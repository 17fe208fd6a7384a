"""The model inputs of the latest frames asked for, kept to re-embed them when the model changes.

The embedding strategies (herding, ProbCover, TypiClust, VeSSAL) remember the
frames asked for as embeddings; a new model has a new embedding space, so the
scorer keeps the preprocessed inputs of the latest ``QueryPolicy.memory``
selections (as float16, half the bytes) and runs a model with a new backbone on
them before its first batch is decided (``QueryPolicy.rebase``); a head-only
release keeps the embeddings and needs nothing. Bounded: at most
``capacity`` inputs (for 3×224×224 inputs, 256 of them take 77 MB).
"""

from collections import deque

import numpy as np


class Exemplars:
    """A ring of the latest selected frames' model inputs.

    Args:
        capacity: inputs kept; 0 keeps none.
    """

    def __init__(self, capacity: int) -> None:
        self._inputs: deque[np.ndarray] = deque(maxlen=max(0, int(capacity)))

    @property
    def capacity(self) -> int:
        return self._inputs.maxlen or 0

    def __len__(self) -> int:
        return len(self._inputs)

    def resize(self, capacity: int) -> None:
        """Keeps the latest ``capacity`` inputs from now on."""
        if capacity != self.capacity:
            self._inputs = deque(self._inputs, maxlen=max(0, int(capacity)))

    def add(self, inputs: np.ndarray) -> None:
        """Keeps these inputs (rows of one batch, in stream order)."""
        if self.capacity:
            self._inputs.extend(np.asarray(inputs, dtype=np.float16))

    def stacked(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """The kept inputs, oldest first, as float32; None if there are none or they do not
        have this per-frame ``shape`` (a model with another input size: they are dropped)."""
        if not self._inputs:
            return None
        if self._inputs[0].shape != tuple(shape):
            self._inputs.clear()
            return None
        return np.stack(self._inputs).astype(np.float32)
