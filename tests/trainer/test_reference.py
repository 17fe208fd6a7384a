"""The drift reference: built by the trainer from its model's outputs, carried in the spec."""

from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.model_spec import ModelSpec
from service.model.inference import OnnxModel
from tests.kafka_helpers import read_json
from tests.trainer.helpers import feed, loop_settings, manifests
from trainer.architectures import build_model
from trainer.export import export_onnx
from trainer.loop import Trainer
from trainer.model_init import default_normalization
from trainer.reference import MIN_HOLDOUT, reference_for
from trainer.samples import Sample


def _spec(model) -> ModelSpec:
    mean, std = default_normalization(1)
    return ModelSpec(
        version="v1",
        arch="small-cnn",
        classes=[str(d) for d in range(10)],
        input_size=(16, 16),
        channels=1,
        mean=list(mean),
        std=list(std),
        embedding_dim=model.embedding_dim,
    )


def _samples(n: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [
        Sample(f"s{i}", rng.normal(size=(1, 16, 16)).astype(np.float32), int(rng.integers(10)))
        for i in range(n)
    ]


def test_reference_uses_the_holdout_when_large_enough_and_round_trips_through_onnx(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = build_model("small-cnn", 10, 1)
    small = reference_for(model, _samples(300, 0), _samples(20, 1), torch.device("cpu"))
    assert small is not None and small.frames == 320  # holdout too small: every sample
    reference = reference_for(
        model, _samples(300, 0), _samples(MIN_HOLDOUT, 1), torch.device("cpu")
    )
    assert reference is not None and reference.frames == MIN_HOLDOUT
    assert reference.embedding_dim == model.embedding_dim and 1 <= reference.k <= 16
    assert len(reference.sample) == len(reference.sample_classes) == MIN_HOLDOUT
    assert abs(sum(reference.class_mix) - 1) < 1e-3
    assert len(reference.model_dump_json()) < 100_000  # compact enough for ONNX metadata
    spec = _spec(model).model_copy(update={"reference": reference})
    path = tmp_path / "m.onnx"
    export_onnx(model, spec, path)
    loaded = OnnxModel.load(path, device="cpu").spec
    assert loaded.reference == ModelSpec.model_validate_json(spec.model_dump_json()).reference
    reduced = loaded.reference.reduce(np.zeros((2, model.embedding_dim)))
    assert reduced.shape == (2, reference.k)


@pytest.mark.slow
async def test_a_trainer_release_carries_a_reference(
    kafka_settings,
    group_id,
    winnow_topics,
    digits,
    tmp_path: Path,
) -> None:
    pngs, targets = digits
    async with Trainer(loop_settings(kafka_settings, group_id, tmp_path)):
        await feed(kafka_settings, winnow_topics, pngs, targets, range(0, 120))
        published = manifests(
            await read_json(
                kafka_settings,
                winnow_topics.models,
                lambda out: any(m["spec"]["labels_trained"] > 0 for m in manifests(out)),
                within=240,
            )
        )
    assert published[0]["spec"]["reference"] is None  # the cold-start model: scorer warms up
    reference = published[-1]["spec"]["reference"]
    assert reference is not None and reference["origin"] == "training"
    assert reference["frames"] >= 60
