"""PAL's expected gain and the ``pal`` filter: the closed form, the kernel count, its memory."""

import numpy as np
import pytest

from service.selection.filters import DecisionContext, StreamFilters
from service.selection.pal import expected_gain, labellings, mean_gamma
from service.selection.policy import QueryPolicy


def _monte_carlo_gain(k: np.ndarray, prior: float, m: int, draws: int, seed: int) -> float:
    """``gain(m) / m`` by sampling: p from Dir(k + prior), m labels from p, the accuracy of the
    decision after them (argmax of k + l) against that of argmax(k)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(k + prior, size=draws)
    labels = np.stack([rng.multinomial(m, row) for row in p])
    after = np.argmax(k[None, :] + labels, axis=1)
    return float((p[np.arange(draws), after] - p[:, np.argmax(k)]).mean() / m)


def test_the_closed_form_agrees_with_sampling() -> None:
    for k in (np.array([0.0, 0.0, 0.0]), np.array([1.0, 0.8, 0.1]), np.array([6.0, 1.0])):
        c = len(k)
        sampled = max(_monte_carlo_gain(k, 0.5, m, 400_000, seed=m) for m in (1, 2))
        closed = expected_gain(k[None, :], prior=0.5, m_max=2)[0] * (1 - 1 / c)
        assert closed == pytest.approx(sampled, abs=3e-3)


def test_the_closed_form_agrees_with_scikit_activeml() -> None:
    skal = pytest.importorskip("skactiveml.pool._probabilistic_al")
    rng = np.random.default_rng(0)
    for c, m_max in ((2, 1), (3, 2), (10, 2), (4, 3)):
        k = rng.gamma(0.5, 2, size=(40, c)) * rng.choice([0, 0.01, 1, 10], size=(40, 1))
        ours = expected_gain(k, prior=1e-3, m_max=m_max) * (1 - 1 / c)
        theirs = skal.cost_reduction(k, m_max=m_max, prior=1e-3)
        np.testing.assert_allclose(ours, np.clip(theirs, 0, None), atol=1e-12)


def test_no_label_near_gains_most_and_many_labels_of_one_class_gain_nothing() -> None:
    uncertain = np.full(10, 0.1)
    sure = np.eye(10)[3] * 0.99 + 0.001
    gains = expected_gain(np.stack([0 * uncertain, 2 * uncertain, 50 * uncertain, 50 * sure]))
    assert gains[0] == pytest.approx(1.0, abs=0.01)  # 1 - 1/C, less what the prior takes
    assert gains[0] > gains[1] > gains[3] and gains[3] < 1e-3
    assert gains[2] > gains[3]  # unsure where many labels are still beats sure
    assert labellings(10, 2)[0].shape == (10 + 55, 10)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="two classes"):
        expected_gain(np.ones((1, 1)))
    with pytest.raises(ValueError):
        expected_gain(np.ones((1, 3)), prior=0.0)
    with pytest.raises(ValueError, match="pal_labels"):
        StreamFilters(["pal"], {"pal_labels": 9})
    with pytest.raises(ValueError, match="pal_memory"):
        StreamFilters(["pal"], {"pal_memory": 0})


def test_the_mean_criterion_narrows_the_kernel_as_the_memory_grows() -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(400, 8))
    assert mean_gamma(rows[:20]) < mean_gamma(rows)
    assert mean_gamma(np.ones((5, 4))) == 0.25  # no spread: 1 / D


def _two_regions(pal: bool, seed: int) -> list[int]:
    """Frames from two regions of embedding space, equally uncertain; the first 30 requests are
    forced into region 0. Returns the region of each later request."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2, 32)) * 3
    policy = QueryPolicy(
        "quantile", utility="margin", budget=0.1, window=400, seed=seed,
        filters=["pal"] if pal else [],
    )  # fmt: skip
    policy.on_model(10, classes=["a", "b", "c"])
    warm = centres[0] + rng.normal(size=(30, 32))
    policy.rebase(warm)  # the frames asked for so far, under the serving model
    regions = []
    for _ in range(60):
        region = rng.integers(0, 2, size=32)
        embeddings = centres[region] + rng.normal(size=(32, 32))
        p = rng.dirichlet(np.full(3, 20.0), size=32)  # all near the three-way boundary
        top = np.sort(p, axis=1)
        margin = 1 - (top[:, -1] - top[:, -2])
        rows = policy.decide({"margin": margin}, DecisionContext(embeddings, p, None))
        regions += [int(region[i]) for i, row in enumerate(rows) if row["selected"]]
    return regions


def test_pal_asks_where_few_frames_were_asked_for() -> None:
    plain = [np.mean(_two_regions(False, seed)[:20]) for seed in range(4)]
    pal = [np.mean(_two_regions(True, seed)[:20]) for seed in range(4)]
    assert np.mean(plain) < 0.65  # margin alone: both regions alike
    assert np.mean(pal) > 0.8  # PAL: the region nothing was asked for, until it fills


def test_a_frame_asked_for_counts_at_once_within_its_batch() -> None:
    filters = StreamFilters(["pal"])
    filters.rebase(np.random.default_rng(0).normal(size=(20, 8)))
    twin = np.ones((2, 8))
    p = np.full((2, 3), 1 / 3)
    filters.begin(np.full(2, 0.5), DecisionContext(twin, p, None))
    first = filters.adjust(0, 0.5)
    filters.record(0, True)
    second = filters.adjust(1, 0.5)
    filters.record(1, False)
    filters.end()
    assert first > 0.9 and second < first - 0.2


def test_the_policy_keeps_and_rebases_the_filter_memory() -> None:
    assert QueryPolicy("variable", cold_start="none", filters=[]).memory == 0
    policy = QueryPolicy("variable", cold_start="none", filters=["pal"])
    assert policy.memory == 256
    new_space = np.random.default_rng(1).normal(size=(300, 16))
    policy.rebase(new_space)
    kept = policy._filters._asked.ordered()
    assert kept.shape == (256, 16)
    np.testing.assert_allclose(np.linalg.norm(kept, axis=1), 1.0)
    np.testing.assert_allclose(kept[-1], new_space[-1] / np.linalg.norm(new_space[-1]))
    small = QueryPolicy(
        "variable", cold_start="none", filters=["pal"], filter_params={"pal_memory": 8}
    )
    assert small.memory == 8


def test_an_embedding_strategy_keeps_its_own_score_and_pal_remembers_its_choices() -> None:
    def run(filters: list[str]) -> tuple[list[bool], QueryPolicy]:
        rng = np.random.default_rng(0)
        policy = QueryPolicy(
            "herding", utility="margin", budget=0.1, window=200, seed=0, cold_start="none",
            filters=filters,  # type: ignore[arg-type]
        )  # fmt: skip
        policy.on_model(10, classes=["a", "b", "c"])
        out: list[bool] = []
        for _ in range(10):
            p = rng.dirichlet(np.ones(3), 32)
            top = np.sort(p, axis=1)
            context = DecisionContext(rng.normal(size=(32, 8)), p, None)
            rows = policy.decide({"margin": 1 - (top[:, -1] - top[:, -2])}, context)
            out += [row["selected"] for row in rows]
        return out, policy

    plain, _ = run([])
    with_pal, policy = run(["pal"])
    assert with_pal == plain and sum(plain) > 5
    assert len(policy._filters._asked) == sum(plain)
