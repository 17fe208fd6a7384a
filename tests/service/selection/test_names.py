"""The names settings and the API accept (``schemas.api``) and the code behind them agree."""

from typing import get_args

import numpy as np
import pytest

from schemas.api import FilterName, PolicyName, SelectorName
from service.selection.diversity import SELECTORS, WindowSelector
from service.selection.filters import FILTERS, DecisionContext, StreamFilters
from service.selection.policy import QueryPolicy
from service.selection.registry import STRATEGIES


def test_every_policy_name_has_a_strategy_and_every_strategy_a_name() -> None:
    assert set(STRATEGIES) == set(get_args(PolicyName))
    assert all(cls.name == name for name, cls in STRATEGIES.items())


def test_filter_and_selector_names_come_from_the_schema() -> None:
    assert FILTERS == get_args(FilterName)
    assert SELECTORS == get_args(SelectorName)
    with pytest.raises(ValueError, match="unknown filters"):
        StreamFilters(["sharpness"])
    with pytest.raises(ValueError, match="unknown selector"):
        WindowSelector("kmeans")


# Knobs that make each filter act on every batch of the stream below.
_AGGRESSIVE = {
    "dedup": {"dedup_similarity": 0.0},
    "density": {"density_beta": 4.0},
    "balance": {"balance_power": 4.0},
    "audit": {"audit_fraction": 1.0, "audit_utility": 1.0},
    "rare": {"rare_power": 4.0},
    "pal": {"pal_prior": 1.0},
}


def _decisions(filters: list[str], params: dict[str, float]) -> list[bool]:
    policy = QueryPolicy(
        "fixed", budget=0.3, window=100, seed=0, filters=filters, filter_params=params
    )
    rng = np.random.default_rng(0)
    out = []
    for _ in range(20):
        probabilities = rng.dirichlet([8.0, 1.0, 1.0], size=32)  # most frames are class 0
        context = DecisionContext(rng.normal(size=(32, 8)), probabilities, ["cam"] * 32)
        out += [d["selected"] for d in policy.decide({"entropy": rng.random(32)}, context)]
    return out


@pytest.mark.parametrize("name", get_args(FilterName))
def test_every_filter_name_changes_the_decisions(name: str) -> None:
    assert set(_AGGRESSIVE) == set(get_args(FilterName))
    assert _decisions([name], _AGGRESSIVE[name]) != _decisions([], {})


@pytest.mark.parametrize("name", get_args(SelectorName))
def test_every_selector_name_picks_within_a_batch(name: SelectorName) -> None:
    policy = QueryPolicy("random", budget=0.25, window=64, seed=0, selector=name)
    assert policy.state().selector == name
    rng = np.random.default_rng(0)
    context = DecisionContext(rng.normal(size=(64, 8)), rng.dirichlet(np.ones(3), 64), None)
    rows = policy.decide({"entropy": rng.random(64)}, context)
    chosen = {row["reason"] for row in rows if row["selected"]}
    assert chosen == ({"random"} if name == "none" else {name})
