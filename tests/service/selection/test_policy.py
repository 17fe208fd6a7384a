"""Query policies: budgets hold, budgets get spent, uncertain frames win, live changes work."""

import json
from collections.abc import Callable

import numpy as np
import pytest

from schemas.api import PolicyName, PolicyUpdate
from schemas.scores import Decision, DecisionRow
from service.config import PolicySettings
from service.selection.filters import DecisionContext
from service.selection.policy import QueryPolicy
from service.selection.strategies import (
    THETA_MIN,
    RandomizedVariableUncertainty,
    SplitUncertainty,
    VariableUncertainty,
)

ALL: list[PolicyName] = [
    "fixed",
    "variable",
    "randomized-variable",
    "split",
    "quantile",
    "random",
    "herding",
    "probcover",
    "typiclust",
    "vessal",
]
SPENDERS: list[PolicyName] = [
    "variable",
    "randomized-variable",
    "split",
    "quantile",
    "random",
    "herding",
    "probcover",
    "typiclust",
    "vessal",
]
UNCERTAINTY_POLICIES: list[PolicyName] = [
    "fixed",
    "variable",
    "randomized-variable",
    "split",
    "quantile",
]
N_FRAMES = 100_000
BUDGET = 0.05
WINDOW = 1000


def _run(policy: QueryPolicy, utilities: np.ndarray, batch: int = 64) -> np.ndarray:
    selected = []
    for start in range(0, len(utilities), batch):
        chunk = {"entropy": utilities[start : start + batch]}
        selected.extend(d["selected"] for d in policy.decide(chunk))
    return np.array(selected, dtype=bool)


def _max_in_any_window(selected: np.ndarray, window: int) -> int:
    return int(np.convolve(selected.astype(int), np.ones(window, dtype=int), "valid").max())


def _policy(name: PolicyName, **kwargs: object) -> QueryPolicy:
    settings = PolicySettings(
        **{"name": name, "utility": "entropy", "budget": BUDGET, "window": WINDOW, "seed": 0}
        | kwargs
    )
    return QueryPolicy.from_settings(settings)


STREAMS: dict[str, Callable[[], np.ndarray]] = {
    "beta": lambda: np.random.default_rng(7).beta(2.0, 5.0, N_FRAMES),
    "all-high": lambda: np.full(N_FRAMES, 0.99),
}


@pytest.fixture(scope="module", params=sorted(STREAMS))
def stream(request: pytest.FixtureRequest) -> tuple[str, np.ndarray]:
    return request.param, STREAMS[request.param]()


@pytest.mark.parametrize("name", ALL)
def test_every_policy_keeps_and_spends_its_budget(
    name: PolicyName, stream: tuple[str, np.ndarray]
) -> None:
    kind, utilities = stream
    policy = _policy(name)
    selected = _run(policy, utilities)
    assert _max_in_any_window(selected, WINDOW) <= BUDGET * WINDOW
    assert policy.seen == N_FRAMES and policy.selected == selected.sum()
    spent = selected.mean()
    if name in SPENDERS or kind == "all-high":
        assert spent == pytest.approx(BUDGET, rel=0.3), f"{name} spent {spent:.4f}"
    else:
        assert 0 <= spent <= BUDGET  # fixed on a calm stream may spend less: its threshold is fixed


@pytest.mark.parametrize("name", UNCERTAINTY_POLICIES)
def test_uncertain_frames_are_preferred(name: PolicyName) -> None:
    utilities = np.random.default_rng(3).beta(2.0, 2.0, 50_000)
    selected = _run(_policy(name), utilities)
    assert selected.any()
    assert utilities[selected].mean() > utilities.mean() + 0.05


def test_random_does_not_prefer_uncertain_frames() -> None:
    utilities = np.random.default_rng(3).beta(2.0, 2.0, 50_000)
    selected = _run(_policy("random"), utilities)
    assert utilities[selected].mean() == pytest.approx(utilities.mean(), abs=0.02)


def test_hourly_cap_is_never_exceeded_with_a_fake_clock() -> None:
    now = [0.0]
    settings = PolicySettings(
        name="variable", utility="entropy", budget=0.5, window=100, labels_per_hour=40, seed=0
    )
    policy = QueryPolicy.from_settings(settings, clock=lambda: now[0])
    selection_times: list[float] = []
    rng = np.random.default_rng(5)
    for _ in range(3000):  # 3000 batches of 16, 10 s apart: ~8.3 hours
        now[0] += 10.0
        decisions = policy.decide({"entropy": rng.random(16)})
        selection_times.extend(now[0] for d in decisions if d["selected"])
        assert policy.state().labels_last_hour <= 40
    times = np.array(selection_times)
    in_hour = np.searchsorted(times, times, side="right") - np.searchsorted(
        times, times - 3600.0, side="right"
    )
    assert in_hour.max() <= 40
    assert len(times) >= 40 * 7  # the cap, not the strategy, was the limit


def test_variable_threshold_moves_as_the_paper_says() -> None:
    rng = np.random.default_rng(0)
    strategy = VariableUncertainty(0.1, {"theta": 0.5, "s": 0.1})
    assert strategy.threshold == pytest.approx(0.5)  # utility scale: 1 - θ
    # certainty c = 1 - 0.8 = 0.2 < θ = 0.5: query, θ ← 0.5 · 0.9 = 0.45
    assert strategy.decide(0.8, True, rng) == (True, "uncertainty")
    assert strategy.params()["s"] == 0.1 and strategy.threshold == pytest.approx(1 - 0.45)
    # c = 0.9 >= θ = 0.45: no query, θ ← 0.45 · 1.1 = 0.495
    assert strategy.decide(0.1, True, rng) == (False, None)
    assert strategy.threshold == pytest.approx(1 - 0.495)
    # no budget: no query and θ stays, however uncertain the frame
    assert strategy.decide(1.0, False, rng) == (False, None)
    assert strategy.threshold == pytest.approx(1 - 0.495)


def test_variable_threshold_stays_usable_over_a_long_run() -> None:
    rng = np.random.default_rng(0)
    strategy = VariableUncertainty(0.1)
    for _ in range(100_000):  # θ·0.99^100000 would underflow to 0 and lock
        strategy.decide(1.0, True, rng)
    assert 1.0 - strategy.threshold >= THETA_MIN
    assert strategy.decide(1.0, True, rng)[0]
    for _ in range(100_000):  # θ·1.01^100000 would overflow
        strategy.decide(0.0, True, rng)
    assert strategy.threshold == pytest.approx(0.0)


def test_randomized_variable_multiplies_theta_by_gaussian_noise() -> None:
    strategy = RandomizedVariableUncertainty(0.1, {"theta": 0.5, "delta": 1.0})
    rng = np.random.default_rng(11)
    compared = []
    for _ in range(4000):
        theta = 1.0 - strategy.threshold
        strategy.decide(0.5, True, rng)
        compared.append((1.0 - strategy.last_threshold) / theta)  # the draw η
    eta = np.array(compared)
    assert eta.mean() == pytest.approx(1.0, abs=0.06)
    assert eta.std() == pytest.approx(1.0, abs=0.06)


def test_split_random_share_is_about_v() -> None:
    strategy = SplitUncertainty(1.0, {"v": 0.2})
    rng = np.random.default_rng(2)
    reasons = [strategy.decide(0.0, True, rng)[1] for _ in range(20_000)]
    share = reasons.count("random") / len(reasons)
    assert share == pytest.approx(0.2, abs=0.015)
    # certain frames are never picked by the uncertainty half once θ has settled
    assert reasons[-5000:].count("uncertainty") <= 5


def test_fixed_threshold_comes_from_the_budget() -> None:
    policy = _policy("fixed", budget=0.2, window=100)
    assert policy.state().threshold == pytest.approx(0.8)
    _run(policy, np.zeros(20))  # a fresh stream's budget grows with the frames seen
    decisions = policy.decide({"entropy": np.array([0.79, 0.8, 0.95, 0.1])})
    assert [d["selected"] for d in decisions] == [False, True, True, False]
    assert decisions[1]["reason"] == "uncertainty" and decisions[1]["threshold"] == pytest.approx(
        0.8
    )


def test_decisions_carry_policy_utility_and_the_threshold_they_were_compared_with() -> None:
    policy = _policy("variable", budget=1.0, params={"theta": 0.5, "s": 0.1})
    first, second = policy.decide({"entropy": np.array([0.9, 0.9]), "margin": np.zeros(2)})
    assert first["policy"] == "variable" and first["utility"] == pytest.approx(0.9)
    assert first["selected"] and first["threshold"] == pytest.approx(0.5)
    assert second["threshold"] == pytest.approx(1 - 0.45)  # moved after the first query
    assert policy.state().selected == 2


def test_same_seed_same_decisions() -> None:
    utilities = np.random.default_rng(1).random(2000)
    runs = [_run(_policy(name), utilities) for name in ("split", "split")]
    assert (runs[0] == runs[1]).all()


def test_nan_utilities_are_not_selected() -> None:
    decisions = _policy("variable").decide({"entropy": np.array([np.nan, 0.5])})
    assert not decisions[0]["selected"] and decisions[0]["utility"] == 0.0


def test_live_update_switches_name_and_keeps_budget_history() -> None:
    policy = _policy("variable", budget=0.1, window=100)
    first = _run(policy, np.full(100, 0.99))
    assert first.sum() == 10 and first[0]  # one at once, then one per ten frames seen
    before = policy.state()
    assert before.budget_used == pytest.approx(0.1)
    state = policy.update(PolicyUpdate(name="split", params={"v": 0.3}))
    assert state.name == "split" and state.params["v"] == 0.3
    assert state.budget_used == before.budget_used and state.seen == 100
    assert state.threshold == pytest.approx(before.threshold)  # θ carries between variable kinds
    # the window is full: frames 101-118 slide out unselected frames, so nothing fits
    assert first[1:19].sum() == 0
    slide = _run(policy, np.ones(1))
    blocked = _run(policy, np.ones(18))
    assert not blocked.any()
    later = _run(policy, np.ones(200))
    assert later.any()
    assert _max_in_any_window(np.concatenate([first, slide, blocked, later]), 100) <= 10


def test_live_budget_change_takes_effect() -> None:
    policy = _policy("random", budget=0.01, window=1000)
    assert _run(policy, np.ones(5000)).mean() <= 0.01
    policy.update(PolicyUpdate(budget=1.0))
    assert _run(policy, np.ones(500)).all()
    state = policy.update(PolicyUpdate(budget=0.1, window=50))
    assert state.budget == 0.1 and state.window == 50
    assert _max_in_any_window(_run(policy, np.ones(2000)), 50) <= 5


def test_live_cap_removal() -> None:
    now = [0.0]
    settings = PolicySettings(
        name="fixed", utility="entropy", budget=1.0, window=10, labels_per_hour=3
    )
    policy = QueryPolicy.from_settings(settings, clock=lambda: now[0])
    assert sum(d["selected"] for d in policy.decide({"entropy": np.ones(10)})) == 3
    state = policy.update(PolicyUpdate(labels_per_hour=0))
    assert state.labels_per_hour is None and state.labels_last_hour == 3
    assert all(d["selected"] for d in policy.decide({"entropy": np.ones(10)}))
    state = policy.update(PolicyUpdate(labels_per_hour=15))
    assert state.labels_per_hour == 15
    assert sum(d["selected"] for d in policy.decide({"entropy": np.ones(10)})) == 2


def test_live_threshold_and_params() -> None:
    policy = _policy("variable")
    state = policy.update(PolicyUpdate(threshold=0.7, params={"s": 0.05}))
    assert state.threshold == pytest.approx(0.7) and state.params["s"] == 0.05
    state = policy.update(PolicyUpdate(name="fixed", threshold=0.6))
    assert state.threshold == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (PolicyUpdate(params={"bogus": 1.0}), "unknown params"),
        (PolicyUpdate(params={"s": 2.0}), "'s' must be"),
        (PolicyUpdate(name="random", params={"s": 0.1}), "unknown params"),
        (PolicyUpdate(name="random", threshold=0.5), "no threshold"),
        (PolicyUpdate(name="quantile", threshold=0.5), "no threshold"),
        (PolicyUpdate(budget=0.0005), "no selection"),
        (PolicyUpdate(labels_per_hour=0.5), "at least 1"),
    ],
)
def test_refused_updates_change_nothing(change: PolicyUpdate, message: str) -> None:
    policy = _policy("variable")
    before = policy.state()
    with pytest.raises(ValueError, match=message):
        policy.update(change)
    assert policy.state() == before


def test_unknown_params_in_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown params \['v'\] for policy 'variable'"):
        _policy("variable", params={"v": 0.1})


def test_cold_start_samples_at_random_within_the_budget() -> None:
    policy = _policy("fixed", budget=0.1, window=100, cold_start="random")
    assert policy.needs == {"entropy"}
    policy.on_model(labels_trained=0)  # an untrained model serves
    assert policy.cold_start and policy.needs == frozenset()
    utilities = np.concatenate([np.zeros(2000), np.ones(2000)])  # a fixed policy takes only 1s
    decisions = []
    for start in range(0, len(utilities), 64):
        decisions += policy.decide({"entropy": utilities[start : start + 64]})
    selected = np.array([d["selected"] for d in decisions])
    assert selected[:2000].sum() > 50, "uninformative frames are sampled too"
    assert _max_in_any_window(selected, 100) <= 10
    chosen = [d for d in decisions if d["selected"]]
    assert {d["reason"] for d in chosen} == {"cold_start"}
    assert {d["policy"] for d in chosen} == {"random"}
    assert policy.state().cold_start
    policy.on_model(labels_trained=50)
    assert not policy.cold_start and policy.needs == {"entropy"}
    after = policy.decide({"entropy": np.zeros(64)})
    assert not any(d["selected"] for d in after)  # back to the fixed threshold


def test_cold_start_needs_no_score_of_the_utility() -> None:
    policy = _policy("variable", utility="aift")
    policy.on_model(labels_trained=0)
    # the engine computed only what the policy needs: the probability utilities
    decisions = policy.decide({"entropy": np.full(8, 0.3), "margin": np.zeros(8)})
    assert len(decisions) == 8 and {d["utility"] for d in decisions} == {0.0}
    policy.on_model(labels_trained=10)
    assert policy.needs == {"aift"}
    with pytest.raises(ValueError, match="utility 'aift' missing"):
        policy.decide({"entropy": np.full(8, 0.3)})


def test_cold_start_can_be_turned_off() -> None:
    for policy in (_policy("fixed", cold_start_random=False), _policy("fixed", cold_start="none")):
        policy.on_model(labels_trained=0)
        assert not policy.cold_start and policy.needs == {"entropy"}
        assert policy.state().cold_start_strategy == "none"
    assert _policy("fixed", cold_start_random=True).state().cold_start_strategy == "random"


def test_cold_start_covers_the_stream_in_embedding_space_by_default() -> None:
    """The default cold start is herding: the frames asked for spread over the clusters of
    the embeddings, and the untrained model's uncertainty is not looked at."""
    policy = _policy("variable", budget=0.05, window=200)
    policy.on_model(labels_trained=0)
    assert policy.state().cold_start_strategy == "herding" and policy.needs == frozenset()
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:4] * 5.0
    chosen: list[int] = []
    for _ in range(20):
        cluster = rng.choice(4, size=32, p=[0.7, 0.1, 0.1, 0.1])
        embeddings = centres[cluster] + rng.normal(0, 0.5, (32, 8))
        # the untrained model is sure of cluster 0 and unsure of nothing else: ignored
        rows = policy.decide({"entropy": (cluster != 0).astype(float)}, DecisionContext(embeddings))
        chosen += [int(cluster[i]) for i, row in enumerate(rows) if row["selected"]]
    # at random all four clusters would be among the first eight in one stream in six
    assert set(chosen[:8]) == {0, 1, 2, 3}
    assert {row["reason"] for row in rows if row["selected"]} <= {"cold_start"}


def test_coverage_leads_until_the_model_has_learned_enough_labels_per_class() -> None:
    """With ``cold_start_per_class`` the cold-start strategy keeps choosing after the first
    model (weighted by uncertainty as the model proves competent) until the model has learned
    from that many labels per class; then the configured strategy takes over."""
    policy = _policy("variable", utility="margin", budget=0.05, window=200, cold_start_per_class=5)
    classes = ["a", "b", "c", "d"]
    rng = np.random.default_rng(1)
    centres = np.eye(8)[:4] * 5.0

    def stream(batches: int) -> list[DecisionRow]:
        rows: list[DecisionRow] = []
        for _ in range(batches):
            cluster = rng.choice(4, size=32, p=[0.7, 0.1, 0.1, 0.1])
            embeddings = centres[cluster] + rng.normal(0, 0.5, (32, 8))
            # the model is unsure of cluster 0 only
            margin = (cluster == 0).astype(float)
            rows += policy.decide({"margin": margin}, DecisionContext(embeddings))
        return rows

    policy.on_model(labels_trained=0, classes=classes)
    assert policy.cold_start and policy.needs == frozenset()
    policy.on_model(labels_trained=19, classes=classes)  # 5 per class: 20 labels
    assert not policy.cold_start and policy.needs == {"margin"}
    warming = [row for row in stream(20) if row["selected"]]
    assert warming and {row["policy"] for row in warming} == {"herding"}
    assert {row["reason"] for row in warming} == {"herding"}
    policy.on_model(labels_trained=20, classes=classes)
    after = [row for row in stream(20) if row["selected"]]
    assert after and {row["policy"] for row in after} == {"variable"}
    assert all(row["utility"] == 1.0 for row in after), "the uncertain cluster only"


def test_cold_start_per_class_cannot_be_negative() -> None:
    with pytest.raises(ValueError):
        PolicySettings(cold_start_per_class=-1)
    with pytest.raises(ValueError, match="cold_start_per_class"):
        QueryPolicy(cold_start_per_class=-1)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"filters": ["dedup", "density", "balance", "audit"]},
        {"selector": "coreset"},
        {"selector": "badge", "filters": ["audit"]},
    ],
    ids=["plain", "filters", "coreset", "badge-audit"],
)
def test_decision_rows_are_valid_decisions(name: PolicyName, extra: dict[str, object]) -> None:
    """The hot path builds no model per frame: its plain rows must match the wire schema."""
    policy = _policy(name, budget=0.3, window=100, **extra)
    rng = np.random.default_rng(1)
    rows = []
    for cold in (True, False):
        policy.on_model(labels_trained=0 if cold else 10)
        for _ in range(10):
            embeddings = rng.normal(size=(32, 8))
            probabilities = rng.dirichlet(np.ones(4), size=32)
            context = DecisionContext(embeddings, probabilities, ["a", "b"] * 16)
            rows += policy.decide({"entropy": rng.random(32)}, context)
    assert any(row["selected"] for row in rows)
    for row in rows:
        assert DecisionRow.__required_keys__ <= set(row) <= set(DecisionRow.__annotations__)
        assert type(row["selected"]) is bool  # numpy bools would not serialize
        Decision.model_validate_json(json.dumps(row))
        assert Decision.model_validate(row).model_dump(exclude_unset=True) == row


def test_a_drift_boost_raises_the_budget_for_a_while_and_tags_requests() -> None:
    now = [0.0]
    policy = QueryPolicy.from_settings(
        PolicySettings(name="fixed", utility="entropy", budget=0.05, window=100, seed=0),
        clock=lambda: now[0],
    )
    ones = np.ones(64)
    before = sum(d["selected"] for d in policy.decide({"entropy": ones}))
    policy.boost(4.0, seconds=10)
    state = policy.state()
    assert state.budget == 0.05 and state.effective_budget == pytest.approx(0.2)
    assert state.boost_seconds_left == pytest.approx(10)
    during = [d for _ in range(4) for d in policy.decide({"entropy": ones})]
    chosen = [d for d in during if d["selected"]]
    assert len(chosen) > 4 * before and {d["reason"] for d in chosen} == {"drift"}
    assert _max_in_any_window(np.array([d["selected"] for d in during]), 100) <= 20
    now[0] = 11.0  # the boost ends on its own
    after = [d for _ in range(4) for d in policy.decide({"entropy": ones})]
    assert policy.state().effective_budget == pytest.approx(0.05)
    assert {d["reason"] for d in after if d["selected"]} <= {"uncertainty"}
    with pytest.raises(ValueError):
        policy.boost(0.5, 10)
