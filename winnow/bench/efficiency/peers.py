"""scikit-activeml's stream strategies as peers, fed the same CNN at the same budget.

Each peer decides frame by frame, as it is meant to, on the probabilities of
the model the run is training (``VariableUncertainty``, ``Split``), or on its
unit-norm embeddings and probabilities with every label so far as its
labeled pool (``StreamProbabilisticAL``, Kottke et al. 2015). Before the first
model update every strategy, peers included, samples at random (the cold
start of the scorer's policy), so the peers differ only once there is a
model to judge by.
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Run = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _precomputed(n_classes: int) -> Any:
    """A scikit-activeml classifier whose features end with the CNN's probabilities."""
    from skactiveml.base import SkactivemlClassifier

    class Precomputed(SkactivemlClassifier):
        def __init__(self, classes: Any = None, missing_label: Any = np.nan, n: int = 2):
            super().__init__(classes=classes, missing_label=missing_label)
            self.n = n

        def fit(self, X: Any, y: Any, sample_weight: Any = None) -> "Precomputed":
            return self

        def predict_proba(self, X: Any) -> np.ndarray:
            return np.asarray(X)[:, -self.n :]

        def predict_freq(self, X: Any) -> np.ndarray:
            return self.predict_proba(X)

    return Precomputed(classes=np.arange(n_classes), n=n_classes)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Peer:
    """One ``skactiveml.stream`` strategy over a run's model.

    Args:
        name: the class name in ``skactiveml.stream``.
        budget: the same budget as the Winnow strategies.
        seed: its random state (the run's seed).
        n_classes: classes of the model.
    """

    def __init__(self, name: str, budget: float, seed: int, n_classes: int) -> None:
        from skactiveml import stream

        cls = getattr(stream, name, None)
        if cls is None:
            raise ValueError(f"skactiveml.stream has no strategy {name!r}")
        self.name = name
        if name == "StreamProbabilisticAL":
            self._strategy = cls(budget=budget, random_state=seed, metric="rbf")
        else:
            self._strategy = cls(budget=budget, random_state=seed)
        self._clf = _precomputed(n_classes)

    def query(
        self, probs: np.ndarray, emb: np.ndarray, labeled: Sequence[Any], run: Run
    ) -> list[int]:
        """The frames of one batch the peer asks for, deciding them in stream order."""
        if self.name == "StreamProbabilisticAL":
            return self._query_pal(np.hstack([_unit(emb), probs]), labeled, run)
        picked = []
        for i in range(len(probs)):
            candidate = probs[i : i + 1]
            idx = self._strategy.query(candidate, self._clf)
            self._strategy.update(candidate, idx)
            if len(idx):
                picked.append(i)
        return picked

    def _query_pal(self, candidates: np.ndarray, labeled: Sequence[Any], run: Run) -> list[int]:
        from trainer.samples import stack

        x_lab, y_lab = stack(labeled)
        p_lab, e_lab = run(x_lab)
        X, y = np.hstack([_unit(e_lab), p_lab]), y_lab.astype(float)
        picked = []
        for i in range(len(candidates)):
            c = candidates[i : i + 1]
            idx, utilities = self._strategy.query(
                c, self._clf, X=X, y=y, utility_weight=np.ones(1), return_utilities=True
            )
            self._strategy.update(c, idx, budget_manager_param_dict={"utilities": utilities})
            if len(idx):
                picked.append(i)
        return picked
