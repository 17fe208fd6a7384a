"""Stream filters: duplicates suppressed, balance shifts selections, audits, density."""

import tracemalloc

import numpy as np
import pytest

from schemas.api import PolicyUpdate
from service.selection.filters import DecisionContext, StreamFilters
from service.selection.policy import QueryPolicy


def _onehot(classes: np.ndarray, n: int) -> np.ndarray:
    p = np.full((len(classes), n), 0.05 / (n - 1))
    p[np.arange(len(classes)), classes] = 0.95
    return p


def test_near_duplicates_of_a_selected_frame_are_suppressed_per_source() -> None:
    rng = np.random.default_rng(0)
    policy = QueryPolicy("fixed", budget=1.0, window=10, filters=["dedup"], seed=0)
    scene = rng.normal(size=16)
    other = rng.normal(size=16)
    embeddings = np.stack(
        [scene + rng.normal(0, 0.01, 16) for _ in range(4)]  # a burst from camera a
        + [scene + rng.normal(0, 0.01, 16)]  # the same scene seen by camera b
        + [other]  # another scene on camera a
    )
    sources = ["a", "a", "a", "a", "b", "a"]
    context = DecisionContext(embeddings, _onehot(np.zeros(6, int), 3), sources)
    decisions = policy.decide({"entropy": np.full(6, 0.9)}, context)
    assert [d["selected"] for d in decisions] == [True, False, False, False, True, True]
    assert decisions[1]["utility"] == 0.0


def test_duplicates_come_back_after_the_window() -> None:
    filters = StreamFilters(["dedup"], {"dedup_window": 3})
    policy = QueryPolicy("fixed", budget=0.5, window=10, seed=0)  # selects u >= 0.5
    policy._filters = filters
    e = np.ones((1, 4))
    first = policy.decide({"entropy": np.array([0.9])}, DecisionContext(e, None, ["a"]))
    rng = np.random.default_rng(1)
    fillers = rng.normal(size=(3, 4)) * 10
    policy.decide({"entropy": np.zeros(3)}, DecisionContext(fillers, None, ["b"] * 3))
    again = policy.decide(
        {"entropy": np.array([0.9, 0.9])}, DecisionContext(np.ones((2, 4)), None, ["a", "a"])
    )
    assert first[0]["selected"]
    # "a" saw only one frame since its selection: still a duplicate, so is the next one
    assert [d["selected"] for d in again] == [False, False]
    policy.decide({"entropy": np.zeros(3)}, DecisionContext(np.ones((3, 4)), None, ["a"] * 3))
    later = policy.decide(
        {"entropy": np.array([0.9])}, DecisionContext(np.ones((1, 4)), None, ["a"])
    )
    assert later[0]["selected"]


def _class_shares(filters: list[str]) -> float:
    rng = np.random.default_rng(3)
    policy = QueryPolicy("quantile", budget=0.1, window=500, filters=filters, seed=0)  # type: ignore[arg-type]
    picked = []
    for _ in range(150):
        classes = np.where(rng.random(64) < 0.8, 0, rng.integers(1, 5, 64))
        p = _onehot(classes, 5)
        context = DecisionContext(rng.normal(size=(64, 8)), p, ["s"] * 64)
        decisions = policy.decide({"entropy": rng.random(64)}, context)
        picked.extend(classes[[d["selected"] for d in decisions]])
    return float(np.mean(np.array(picked) == 0))


def test_class_balance_shifts_selections_away_from_the_busy_class() -> None:
    plain, balanced = _class_shares([]), _class_shares(["balance"])
    assert plain == pytest.approx(0.8, abs=0.05)
    assert balanced < plain - 0.2


def test_audit_picks_confident_frames_at_about_the_set_fraction() -> None:
    rng = np.random.default_rng(0)
    policy = QueryPolicy(
        "fixed",
        budget=0.5,
        window=1000,
        filters=["audit"],
        filter_params={"audit_fraction": 0.05},
        seed=0,
    )
    decisions = []
    for _ in range(100):
        decisions += policy.decide({"entropy": rng.uniform(0, 0.05, 100)})
    audited = [d for d in decisions if d["selected"]]
    assert all(d["reason"] == "audit" for d in audited)
    assert len(audited) / len(decisions) == pytest.approx(0.05, abs=0.01)


def test_density_down_weights_outliers() -> None:
    rng = np.random.default_rng(0)
    filters = StreamFilters(["density"])
    dense = rng.normal(size=(64, 8)) * 0.1 + 3.0
    filters.begin(np.ones(64), DecisionContext(dense, None, None))
    filters.end()
    batch = np.vstack([rng.normal(size=(7, 8)) * 0.1 + 3.0, -np.full((1, 8), 3.0)])
    weighted = filters.begin(np.ones(8), DecisionContext(batch, None, None))
    assert weighted[-1] < 0.5 * weighted[:-1].min()


def test_filters_change_live_and_bad_ones_are_refused() -> None:
    policy = QueryPolicy("variable", budget=0.1)
    state = policy.update(
        PolicyUpdate(filters=["dedup", "audit"], filter_params={"audit_fraction": 0.02})
    )
    assert state.filters == ["dedup", "audit"] and state.filter_params["audit_fraction"] == 0.02
    with pytest.raises(ValueError, match="unknown filter params"):
        policy.update(PolicyUpdate(filter_params={"nope": 1.0}))
    assert policy.update(PolicyUpdate(filters=[])).filters == []


def test_old_call_without_context_still_works_with_filters_on() -> None:
    policy = QueryPolicy("variable", budget=0.1, filters=["dedup", "density", "balance"])
    decisions = policy.decide({"entropy": np.linspace(0, 1, 50)})
    assert len(decisions) == 50


def _screening(rare: bool, seed: int) -> tuple[int, float]:
    """Three classes: "a" and "b" common (60 % and 37 %) with a wide boundary between them,
    "r" rare (3 %) and near its own boundary with "a". The oracle answers every request.
    Returns the rare frames among the first 40 requests and their share of all requests."""
    rng = np.random.default_rng(seed)
    names = ["a", "b", "r"]
    policy = QueryPolicy(
        "quantile", utility="margin", budget=0.02, window=500, seed=seed,
        filters=["rare"] if rare else [],
    )  # fmt: skip
    policy.on_model(10, classes=names)
    asked: list[int] = []
    for _ in range(150):
        truth = rng.choice(3, size=32, p=[0.6, 0.37, 0.03])
        share_a = rng.beta(5, 5, 32)  # a against b: many frames near that boundary
        p_rare = np.where(truth == 2, rng.beta(3, 4, 32), 0.01)
        rest = 1.0 - p_rare
        toward_a = np.where(truth == 2, 0.7, share_a)
        p = np.stack([rest * toward_a, rest * (1 - toward_a), p_rare], axis=1)
        top = np.sort(p, axis=1)
        margin = 1 - (top[:, -1] - top[:, -2])
        rows = policy.decide({"margin": margin}, DecisionContext(None, p, None))
        for i, row in enumerate(rows):
            if row["selected"]:
                asked.append(int(truth[i] == 2))
                policy.on_answer(names[int(p[i].argmax())], names[truth[i]])
    return sum(asked[:40]), float(np.mean(asked))


def test_a_rare_class_near_the_boundary_is_asked_for_early_and_labels_are_balanced() -> None:
    plain = [_screening(False, seed) for seed in range(3)]
    aware = [_screening(True, seed) for seed in range(3)]
    assert np.mean([early for early, _ in aware]) > 2 * max(1, np.mean([e for e, _ in plain]))
    share = np.mean([s for _, s in aware])
    assert share > 2 * np.mean([s for _, s in plain]) and share < 0.6


def test_the_dedup_memory_keeps_row_copies_within_its_window_and_only_when_dedup_is_on() -> None:
    """The filter remembers each selected frame's embedding for the dedup window. Fails if it
    keeps views into the batches (each pins its batch's N x 128 float64 embeddings: 8.1 MiB
    held here when they were views), keeps rows past the window, or keeps them while dedup is off
    (the default filters are ``rare`` alone)."""
    for names, most in ((["rare"], 0), (["dedup"], 64)):
        rng = np.random.default_rng(0)
        filters = StreamFilters(names)
        tracemalloc.start()
        try:
            for _ in range(300):
                embeddings = rng.normal(size=(32, 128))  # traced: what is kept of it counts
                sources = ["a", "b"] * 16
                filters.begin(np.zeros(32), DecisionContext(embeddings, None, sources))
                for index in range(32):
                    filters.record(index, selected=index < 2)  # one selection per source
                filters.end()
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        kept = [row for recent in filters._recent.values() for _, row in recent]
        assert len(kept) <= 2 * (most // 16 + 1), names  # a source sees 16 frames a batch
        assert all(row.base is None and row.nbytes == 128 * 8 for row in kept)
        # the density reservoir's last few batches and the copies (0.3 MiB), not 256 batches
        assert held < 2 * 2**20, f"{names}: {held / 2**20:.1f} MiB"


def test_the_dedup_memory_keeps_the_most_recent_sources_only() -> None:
    """A stream whose source ids keep changing must not grow the filter: it keeps the dedup
    memory of the ``_SOURCES_MAX`` sources seen most recently and nothing per source with
    dedup off. Fails if per-source state has no bound, is kept while dedup is off, or drops a
    source that is still sending (its near-duplicate would no longer be suppressed)."""
    from service.selection import filters as module

    rng = np.random.default_rng(0)
    scene = rng.normal(size=8) * 3
    for names in (["rare"], ["dedup"]):
        filters = StreamFilters(names)
        filters.begin(np.ones(1), DecisionContext(scene[None], None, ["kept"]))
        filters.record(0, selected=True)
        filters.end()
        for start in range(0, 3 * module._SOURCES_MAX, 500):  # ever-new sources, and "kept"
            embeddings = rng.normal(size=(501, 8))
            sources = ["kept"] + [f"s{start + i}" for i in range(500)]
            filters.begin(np.ones(501), DecisionContext(embeddings, None, sources))
            for index in range(501):
                filters.record(index, selected=index % 7 == 1)
            filters.end()
        if names == ["rare"]:
            assert not filters._frames and not filters._recent
            continue
        assert len(filters._frames) == module._SOURCES_MAX
        assert set(filters._recent) <= set(filters._frames)
        assert "s0" not in filters._frames
        near = scene + rng.normal(0, 0.01, 8)
        filters.begin(np.ones(1), DecisionContext(near[None], None, ["kept"]))
        assert filters._is_duplicate(0)


def test_a_new_backbone_drops_what_the_filters_kept_of_the_old_space() -> None:
    """A frame selected under the old backbone and a later frame whose new-space embedding
    happens to equal the old row are unrelated: the dedup memory and the density reservoir
    (old space) are dropped on rebase, the per-source frame counts kept. Fails if the old rows
    still suppress the frame or still weigh the density."""
    rng = np.random.default_rng(2)
    policy = QueryPolicy("fixed", budget=1.0, window=100, filters=["dedup", "density"], seed=0)
    fillers = rng.normal(size=(40, 8))  # fills the density reservoir past its 32-frame minimum
    policy.decide({"entropy": np.zeros(40)}, DecisionContext(fillers, None, ["b"] * 40))
    row = rng.normal(size=(1, 8)) * 3
    first = policy.decide({"entropy": np.array([0.9])}, DecisionContext(row, None, ["a"]))
    assert first[0]["selected"]
    twin = policy.decide({"entropy": np.array([0.9])}, DecisionContext(row, None, ["a"]))
    assert not twin[0]["selected"]  # same space: a duplicate
    filters = policy._filters
    assert filters._reservoir and filters._recent
    policy.rebase(np.zeros((0, 0)))
    assert not filters._reservoir and not filters._recent
    assert filters._frames["a"] == 2  # the dedup window still counts a's frames
    again = policy.decide({"entropy": np.array([0.9])}, DecisionContext(row, None, ["a"]))
    assert again[0]["selected"] and again[0]["utility"] == pytest.approx(0.9)
