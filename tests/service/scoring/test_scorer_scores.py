"""The scorer computes AIFT and committee scores only when the policy's utility needs them."""

from pathlib import Path

import numpy as np
import pytest

from schemas.scores import Scores
from service.config import PolicySettings, Settings
from service.model.inference import OnnxModel
from service.pipeline.scorer import Scorer
from service.scoring.committee import head_of


class _Counting:
    """Wraps a model and records the rows of every run call."""

    def __init__(self, model: OnnxModel) -> None:
        self.model, self.rows = model, []

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.rows.append(len(batch))
        return self.model.run(batch)


@pytest.mark.parametrize(
    ("utility", "extra", "rows"),
    [
        ("entropy", set(), [5]),
        ("aift", {"aift", "aift_entropy", "aift_diversity"}, [5 * 9]),
        ("bald", {"bald", "vote_entropy", "average_kl"}, [5]),
    ],
)
def test_scores_by_utility(
    digits_model_path: Path, utility: str, extra: set[str], rows: list[int]
) -> None:
    model = OnnxModel.load(digits_model_path, device="cpu")
    settings = Settings(policy=PolicySettings(utility=utility, aift_views=8))  # type: ignore[arg-type]
    scorer = Scorer(settings, model)
    spec = model.spec
    inputs = np.random.default_rng(0).normal(size=(5, spec.channels, *spec.input_size))
    counting = _Counting(model)
    probabilities, embeddings, scores = scorer._run_and_score(
        counting,
        inputs.astype(np.float32),
        utility,  # type: ignore[arg-type]
    )
    assert counting.rows == rows  # the views ride in the same run call
    assert probabilities.shape == (5, len(spec.classes)) and len(embeddings) == 5
    assert set(scores) == {"least_confidence", "margin", "entropy"} | extra
    for values in scores.values():
        assert values.shape == (5,) and np.all((values >= 0) & (values <= 1))
    Scores(**{name: float(values[0]) for name, values in scores.items()})


def test_exported_models_carry_their_head_for_mc_dropout(digits_model_path: Path) -> None:
    model = OnnxModel.load(digits_model_path, device="cpu")
    head = head_of(model)
    assert head is not None
    weight, bias, rate = head
    assert weight.shape == (len(model.spec.classes), model.spec.embedding_dim)
    assert bias.shape == (len(model.spec.classes),) and 0 < rate < 1
    # the head reproduces the model's probabilities from its embedding
    inputs = np.random.default_rng(1).normal(size=(3, model.spec.channels, *model.spec.input_size))
    probabilities, embeddings = model.run(inputs.astype(np.float32))
    logits = embeddings @ weight.T + bias
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(expected / expected.sum(1, keepdims=True), probabilities, atol=1e-4)
