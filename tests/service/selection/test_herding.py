"""Stream herding: covers every cluster, passes over near-duplicates, hands over to uncertainty."""

import numpy as np

from service.selection.filters import DecisionContext
from service.selection.policy import QueryPolicy
from tests.service.selection.synthetic import clusters


def _herding(**kw: object) -> QueryPolicy:
    settings = {"budget": 0.05, "window": 200, "seed": 0, "cold_start": "none"} | kw
    return QueryPolicy("herding", utility="margin", **settings)  # type: ignore[arg-type]


def _stream(policy: QueryPolicy, batches: list[tuple[np.ndarray, np.ndarray]]) -> list[int]:
    """Indices (over the whole stream) of the frames asked for."""
    chosen, offset = [], 0
    for embeddings, utilities in batches:
        rows = policy.decide({"margin": utilities}, DecisionContext(embeddings))
        chosen += [offset + i for i, row in enumerate(rows) if row["selected"]]
        offset += len(rows)
    return chosen


def test_every_cluster_is_asked_for_early_and_small_ones_more_than_their_share() -> None:
    rng = np.random.default_rng(1)
    points, labels = clusters(rng, 1600, [0.55, 0.25, 0.1, 0.1], outliers=0.05)
    batches = [(points[i : i + 32], np.zeros(32)) for i in range(0, 1600, 32)]
    chosen = labels[_stream(_herding(), batches)]
    assert len(chosen) >= 40
    # at random the four clusters would be the first four picks once in 30 streams
    assert sorted(chosen[:4]) == [0, 1, 2, 3]
    small = np.isin(chosen, (2, 3)).mean()
    assert small > 0.22  # 19 % of the stream; herding covers, it does not sample by mass
    assert (chosen == -1).mean() <= 0.05  # outliers no more often than they come


def test_near_duplicates_of_a_burst_are_passed_over() -> None:
    """Video: bursts of five near-copies. Herding asks for at most one frame of a burst."""
    rng = np.random.default_rng(2)
    scenes, _ = clusters(rng, 400, [1.0] * 8, spread=1.0)
    frames = np.repeat(scenes, 5, axis=0) + rng.normal(0, 0.02, (2000, 16))
    burst = np.repeat(np.arange(400), 5)
    batches = [(frames[i : i + 20], np.zeros(20)) for i in range(0, 2000, 20)]
    chosen = _stream(_herding(budget=0.1, window=100), batches)
    assert len(chosen) >= 50
    repeats = len(chosen) - len(set(burst[chosen]))
    assert repeats <= 0.05 * len(chosen)


def test_uncertainty_takes_over_as_the_measured_accuracy_grows() -> None:
    """Two equal clusters; the model is unsure only of the second. Before answers come back
    herding covers both alike; once the answers say the model is right, it asks where the
    model is unsure."""
    rng = np.random.default_rng(3)

    def picks(policy: QueryPolicy) -> np.ndarray:
        points, labels = clusters(rng, 1600, [0.5, 0.5], spread=1.0)
        utilities = np.where(labels == 1, 0.9, 0.05)
        batches = [(points[i : i + 32], utilities[i : i + 32]) for i in range(0, 1600, 32)]
        return labels[_stream(policy, batches)]

    fresh = picks(_herding())
    assert 0.3 < (fresh == 1).mean() < 0.7
    assert fresh.size and _herding().state().blend == 0.0
    competent = _herding()
    for i in range(50):  # 50 answers, nine in ten right, classes balanced
        competent.on_answer(str(i % 2), str(i % 2) if i % 10 else "x")
    assert competent.state().blend > 0.7
    assert (picks(competent) == 1).mean() > 0.7
