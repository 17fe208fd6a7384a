"""Windowed selection: spread-out picks, and every strategy keeps its budget in every mode."""

import numpy as np
import pytest

from schemas.api import PolicyName, PolicyUpdate
from service.selection.diversity import gradient_embeddings, k_center_greedy, kmeans_pp
from service.selection.filters import DecisionContext
from service.selection.policy import QueryPolicy
from service.selection.registry import STRATEGIES

CENTRES = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])


def _clusters(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(3), [30, 5, 5])  # one crowded cluster, two small ones
    return CENTRES[labels] + rng.normal(0, 0.3, (40, 2)), labels


def test_k_center_greedy_covers_every_cluster() -> None:
    points, labels = _clusters(np.random.default_rng(0))
    picks = k_center_greedy(points, 3)
    assert sorted(labels[picks]) == [0, 1, 2]
    # with a centre already at the crowded cluster, the two others come first
    picks = k_center_greedy(points, 2, centers=CENTRES[:1])
    assert sorted(labels[picks]) == [1, 2]


def test_badge_seeding_spreads_over_gradient_embeddings() -> None:
    rng = np.random.default_rng(0)
    points, labels = _clusters(rng)
    hits = [len(set(labels[kmeans_pp(points + 20, 3, rng)])) for _ in range(20)]
    assert np.mean(hits) > 2.5
    p = np.array([[0.9, 0.1], [0.5, 0.5]])
    g = gradient_embeddings(p, np.array([[1.0, 2.0], [1.0, 2.0]]))
    np.testing.assert_allclose(g, [[-0.1, -0.2, 0.1, 0.2], [-0.5, -1.0, 0.5, 1.0]])


def _max_in_any_window(selected: np.ndarray, window: int) -> int:
    return int(np.convolve(selected.astype(int), np.ones(window, dtype=int), "valid").max())


MODES = {
    "filters": {"filters": ["dedup", "density", "balance", "audit"]},
    "coreset": {"selector": "coreset"},
    "badge": {"selector": "badge", "filters": ["dedup"]},
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_keeps_its_budget_with_filters_and_windows(
    name: PolicyName, mode: str
) -> None:
    rng = np.random.default_rng(0)
    budget, window = 0.05, 500
    policy = QueryPolicy(name, budget=budget, window=window, seed=0, **MODES[mode])  # type: ignore[arg-type]
    selected = []
    for _ in range(120):
        emb = rng.normal(size=(50, 8))
        p = rng.dirichlet(np.ones(4), 50)
        context = DecisionContext(emb, p, list(rng.choice(["a", "b"], 50)))
        decisions = policy.decide({"entropy": rng.random(50)}, context)
        selected.extend(d["selected"] for d in decisions)
    flags = np.array(selected)
    assert _max_in_any_window(flags, window) <= policy.window_limit
    if name != "fixed":  # the fixed threshold need not spend the budget
        assert flags.mean() > 0.5 * budget  # and still spends it


def test_windowed_picks_spread_out_frames_of_a_batch() -> None:
    rng = np.random.default_rng(0)
    points, labels = _clusters(rng)
    policy = QueryPolicy("fixed", budget=0.075, window=40, selector="coreset", seed=0)
    policy.update(PolicyUpdate(threshold=0.0))  # every frame passes: k = the budget's 3
    decisions = policy.decide({"entropy": np.full(40, 0.5)}, DecisionContext(points, None, None))
    chosen = [i for i, d in enumerate(decisions) if d["selected"]]
    assert len(chosen) == 3 and sorted(labels[chosen]) == [0, 1, 2]
    assert {decisions[i]["reason"] for i in chosen} == {"coreset"}
    assert policy.update(PolicyUpdate(selector="none")).selector == "none"
