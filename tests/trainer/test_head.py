"""The head refit on frozen embeddings (trainer/head.py) and its release artifact
(trainer/refit.py), on real handwritten digits with real torch."""

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.model_spec import ModelSpec
from schemas.models import HeadArtifact
from schemas.pixels import image_to_input
from tests.trainer.helpers import digit_spec
from trainer.architectures import WinnowNet, build_model
from trainer.evaluate import accuracy
from trainer.head import EmbeddingCache, LinearHead, embed, fit_head, head_of, refit_head
from trainer.model_init import seed_everything
from trainer.refit import head_artifact, refit_wait, restore_head, save_head, unlearned
from trainer.samples import Sample, stack
from trainer.store import TrainItem

CPU = torch.device("cpu")
Digits = tuple[list[bytes], np.ndarray]


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return digit_spec("base-1")


@pytest.fixture(scope="module")
def samples(digits: Digits, spec: ModelSpec) -> tuple[list[Sample], list[Sample]]:
    """The first 1,200 digits to learn from, the other 597 to test on."""
    pngs, targets = digits
    out = [
        Sample(f"f{i}", image_to_input(Image.open(io.BytesIO(png)), spec), int(targets[i]))
        for i, png in enumerate(pngs)
    ]
    return out[:1200], out[1200:]


def _model() -> WinnowNet:
    seed_everything(0)
    return build_model("small-cnn", 10, 1).eval()


def test_a_refit_head_learns_the_digits_on_a_random_backbone_and_changes_nothing_else(
    samples: tuple[list[Sample], list[Sample]],
) -> None:
    train, test = samples
    model = _model()
    before = copy.deepcopy(model.state_dict())
    refit = refit_head(model, train[:300], CPU)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    backbone = {k: v for k, v in refit.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(v, before[k]) for k, v in backbone.items())
    assert not torch.equal(refit.head.weight, model.head.weight)
    # An untrained backbone's random features are still features: a linear head on them
    # learns most of the digits from a few hundred labels (chance is 0.1).
    assert accuracy(model, test, CPU) < 0.2
    assert accuracy(refit, test, CPU) > 0.8


def test_the_fit_is_the_penalized_optimum_pulled_towards_the_prior(
    samples: tuple[list[Sample], list[Sample]],
) -> None:
    train, _ = samples
    model = _model()
    inputs, labels = stack(train[:100])
    x = embed(model, inputs, CPU)
    prior = head_of(model)
    loose = fit_head(x, labels, 10, prior=prior, l2=0.01)
    tight = fit_head(x, labels, 10, prior=prior, l2=1e5)
    distance = [float(np.abs(h.weight - prior.weight).max()) for h in (loose, tight)]
    assert distance[1] < 0.05 * distance[0], distance
    # The optimum, not an artefact of the optimizer: every label right on a separable set.
    assert (loose.predict(x) == labels).all()
    zero = LinearHead(np.zeros_like(prior.weight), np.zeros_like(prior.bias))
    again = fit_head(x, labels, 10, prior=zero, l2=0.01)
    assert (again.predict(x) == labels).mean() == 1.0


def test_fit_head_refuses_what_it_cannot_fit() -> None:
    x = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="labels must be"):
        fit_head(x, np.array([0, 1, 5]), 3)
    with pytest.raises(ValueError, match="N labels"):
        fit_head(x, np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="prior"):
        fit_head(x, np.array([0, 1, 2]), 3, prior=LinearHead(np.zeros((2, 4)), np.zeros(2)))


def test_the_embedding_cache_embeds_each_frame_once_per_backbone(
    digits: Digits, spec: ModelSpec
) -> None:
    pngs, _ = digits
    images = {f"f{i}": pngs[i] for i in range(20)}
    reads: list[list[str]] = []

    def read(frame_ids: list[str]) -> dict[str, bytes]:
        reads.append(frame_ids)
        return {f: images[f] for f in frame_ids if f in images}

    cache, model = EmbeddingCache(), _model()
    first = cache.embeddings(model, spec, "v1", [f"f{i}" for i in range(10)], read, CPU)
    again = cache.embeddings(model, spec, "v1", [f"f{i}" for i in range(12)], read, CPU)
    assert reads == [[f"f{i}" for i in range(10)], ["f10", "f11"]] and cache.embedded == 12
    assert all(np.array_equal(first[f], again[f]) for f in first)
    inputs = np.stack([image_to_input(Image.open(io.BytesIO(pngs[3])), spec)])
    assert np.allclose(again["f3"], embed(model, inputs, CPU)[0], atol=1e-6)
    cache.embeddings(model, spec, "v2", ["f0", "missing"], read, CPU)  # another backbone
    assert reads[-1] == ["f0", "missing"] and cache.embedded == 13


def test_the_head_artifact_is_small_and_reads_back_the_same_float32_head(
    spec: ModelSpec, tmp_path: Path
) -> None:
    model = _model()
    head = head_of(model)
    head_spec = spec.model_copy(update={"version": "h1", "labels_trained": 3})
    artifact = head_artifact(head_spec, spec.version, head, 0.3)
    parsed = HeadArtifact.model_validate_json(artifact)
    assert parsed.base_version == "base-1" and parsed.spec == head_spec
    assert np.array_equal(np.asarray(parsed.weight, np.float32), head.weight)
    assert np.array_equal(np.asarray(parsed.bias, np.float32), head.bias)
    assert len(artifact) < 32 * 1024, len(artifact)  # 10 x 128 weights
    # saved next to the checkpoints, the head is put back on its own backbone only
    changed = LinearHead(head.weight * 2, head.bias + 1)
    save_head(tmp_path, head_artifact(head_spec, spec.version, changed, 0.3))
    restored, restored_spec = restore_head(tmp_path, model, spec)
    assert restored_spec == head_spec and np.array_equal(head_of(restored).weight, changed.weight)
    other = spec.model_copy(update={"version": "base-2"})
    assert restore_head(tmp_path, model, other) == (model, other)


def test_unlearned_leaves_out_the_holdout_and_what_the_head_learned() -> None:
    from trainer.evaluate import is_holdout

    items = [TrainItem(f"f{i}", "a", i, True) for i in range(200)]
    held = sum(is_holdout(item.frame_id, 0.2) for item in items)
    assert 0 < held < 200
    assert unlearned(items, {}, 0.2) == 200 - held
    covered = {item.frame_id: "a" for item in items[:50]}
    covered["f0"] = "b"  # learned with another label: still to learn
    expected = sum(
        1
        for item in items
        if not is_holdout(item.frame_id, 0.2) and covered.get(item.frame_id) != "a"
    )
    assert unlearned(items, covered, 0.2) == expected < 200 - held


def test_a_sample_weight_counts_as_copies_of_the_sample() -> None:
    """Frequency weights: weight 3 on a sample fits the same head as three copies of it (the
    mean, the centring and the penalty's n all count it three times). Fails if a weight is
    ignored or normalised away."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 6))
    y = rng.integers(0, 3, 30)
    weights = np.ones(30)
    weights[:4] = 3.0
    copies = np.concatenate([x, x[:4], x[:4]]), np.concatenate([y, y[:4], y[:4]])
    weighted = fit_head(x, y, 3, sample_weight=weights)
    repeated = fit_head(*copies, 3)
    plain = fit_head(x, y, 3)
    np.testing.assert_allclose(weighted.weight, repeated.weight, atol=1e-4)
    np.testing.assert_allclose(weighted.bias, repeated.bias, atol=1e-4)
    assert np.abs(weighted.weight - plain.weight).max() > 1e-2
    with pytest.raises(ValueError, match="sample weights"):
        fit_head(x, y, 3, sample_weight=np.zeros(30))


def test_refits_wait_for_a_share_of_the_labels_so_their_total_cost_stays_linear() -> None:
    """Catches a refit cadence that ignores the labels learned: refits every 3 labels, each
    over every label, would fit about N² / 6 labels in all by N labels."""
    assert [refit_wait(n, 3, 0.01) for n in (0, 300, 301, 1_000, 5_000)] == [3, 3, 4, 10, 50]
    assert refit_wait(5_000, 3, 0.0) == 3
    learned, fitted, refits = 0, 0, 0
    while learned < 6_000:
        learned += refit_wait(learned, 3, 0.01)
        fitted, refits = fitted + learned, refits + 1
    assert refits < 500 and fitted < 120 * 6_000  # each label about 1 / 0.01 times
