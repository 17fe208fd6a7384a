"""The scoring engine computes exactly the scores the policy needs; every utility name has one."""

import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import get_args

import numpy as np
import pytest

from schemas.api import ProbabilityUtilityName, UtilityName
from schemas.scores import Scores
from service.config import PolicySettings
from service.model.inference import OnnxModel
from service.scoring.committee import head_from_metadata
from service.scoring.engine import ScoringEngine
from service.scoring.uncertainty import UTILITIES

ALWAYS = set(get_args(ProbabilityUtilityName))


class _Counting:
    """Wraps a model and records the rows of every run call."""

    def __init__(self, model: OnnxModel, metadata: Mapping[str, str] | None = None) -> None:
        self.model, self.rows = model, []
        self.metadata = model.metadata if metadata is None else metadata

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.rows.append(len(batch))
        return self.model.run(batch)


@pytest.fixture(scope="module")
def model(digits_model_path: Path) -> OnnxModel:
    return OnnxModel.load(digits_model_path, device="cpu")


def _inputs(model: OnnxModel, n: int = 5) -> np.ndarray:
    spec = model.spec
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, spec.channels, *spec.input_size)).astype(np.float32)


@pytest.mark.parametrize(
    ("needs", "extra", "rows"),
    [
        (set(), set(), [5]),  # cold start: nothing beyond the probability utilities
        ({"entropy"}, set(), [5]),
        ({"aift"}, {"aift", "aift_entropy", "aift_diversity"}, [5 * 9]),
        ({"bald"}, {"bald", "vote_entropy", "average_kl"}, [5]),
    ],
)
def test_scores_by_need(
    model: OnnxModel, needs: set[str], extra: set[str], rows: list[int]
) -> None:
    engine = ScoringEngine.from_settings(PolicySettings(aift_views=8))
    counting = _Counting(model)
    scored = engine.score(counting, _inputs(model), needs)
    assert counting.rows == rows  # the views ride in the same run call; MC dropout runs none
    assert scored.probabilities.shape == (5, len(model.spec.classes))
    assert len(scored.embeddings) == 5
    assert set(scored.scores) == ALWAYS | extra
    for values in scored.scores.values():
        assert values.shape == (5,) and np.all((values >= 0) & (values <= 1))
    Scores(**{name: float(values[0]) for name, values in scored.scores.items()})


def test_every_utility_name_is_scored_when_needed(model: OnnxModel) -> None:
    engine = ScoringEngine(seed=0)
    implemented: set[str] = set()
    for name in get_args(UtilityName):
        scores = engine.score(model, _inputs(model), {name}).scores
        assert name in scores, name
        implemented |= set(scores)
    assert implemented == set(get_args(UtilityName)) == set(Scores.model_fields)
    assert set(UTILITIES) == ALWAYS


def test_the_release_committee_runs_the_earlier_models(model: OnnxModel) -> None:
    engine = ScoringEngine(committee="releases", committee_size=3)
    earlier, serving = _Counting(model), _Counting(model)
    engine.on_model(earlier)
    engine.on_model(serving)
    scored = engine.score(serving, _inputs(model), {"vote_entropy"})
    assert serving.rows == [5] and earlier.rows == [5]
    assert np.allclose(scored.scores["vote_entropy"], 0.0)  # the same model agrees with itself
    earlier.rows.clear()
    engine.score(serving, _inputs(model), {"bald"})  # BALD keeps MC dropout over the head
    assert earlier.rows == []


def test_without_a_head_the_committee_is_the_releases(model: OnnxModel) -> None:
    engine = ScoringEngine()
    earlier, serving = _Counting(model, {}), _Counting(model, {})
    engine.on_model(earlier)
    engine.on_model(serving)
    engine.score(serving, _inputs(model), {"bald"})
    assert earlier.rows == [5]


def test_with_mc_dropout_over_a_head_the_earlier_models_are_let_go(model: OnnxModel) -> None:
    """Fails if the engine keeps the models before the serving one while MC dropout over the
    serving model's head makes the committee: each would hold its ONNX Runtime session and
    that session's arena for nothing (a soak scorer held two of them)."""
    engine = ScoringEngine()  # committee: mc_dropout
    earlier = _Counting(model)
    released = weakref.ref(earlier)
    engine.on_model(earlier)
    serving = _Counting(model)
    engine.on_model(serving)
    del earlier
    assert released() is None
    assert len(engine.committee) == 1
    engine.score(serving, _inputs(model), {"bald"})
    assert serving.rows == [5]  # MC dropout over the head: no other model runs


def test_exported_models_carry_their_head_for_mc_dropout(model: OnnxModel) -> None:
    head = head_from_metadata(model.metadata)
    assert head is not None
    weight, bias, rate = head
    assert weight.shape == (len(model.spec.classes), model.spec.embedding_dim)
    assert bias.shape == (len(model.spec.classes),) and 0 < rate < 1
    # the head reproduces the model's probabilities from its embedding
    probabilities, embeddings = model.run(_inputs(model, 3))
    logits = embeddings @ weight.T + bias
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(expected / expected.sum(1, keepdims=True), probabilities, atol=1e-4)
