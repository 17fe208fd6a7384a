"""Trainer checkpoints: atomic files, a moving ``latest`` pointer, exact round trips."""

from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.model_spec import ModelSpec
from trainer.architectures import WinnowNet, build_model
from trainer.checkpoint import LATEST, latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.errors import CheckpointError
from trainer.finetune import predict_proba


def _spec(version: str) -> ModelSpec:
    return ModelSpec(
        version=version,
        parent_version="0-init",
        arch="small-cnn",
        classes=["normal", "pneumonia"],
        input_size=(16, 16),
        channels=1,
        mean=[0.5],
        std=[0.5],
        embedding_dim=128,
        labels_trained=42,
        metrics={"holdout_accuracy": 0.9},
    )


def _trained_model(seed: int) -> WinnowNet:
    """A model whose weights and BatchNorm statistics differ from a fresh build."""
    torch.manual_seed(seed)
    model = build_model("small-cnn", 2, 1)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 1, 16, 16) * 3 + 1)  # moves the running statistics
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def test_round_trip_gives_identical_predictions(tmp_path: Path) -> None:
    model = _trained_model(0)
    spec = _spec("1-abc")
    path = save_checkpoint(tmp_path, model, spec)
    assert path == tmp_path / "1-abc.pt" and path.is_file()
    loaded, loaded_spec = load_checkpoint(path)
    assert loaded_spec == spec
    assert not loaded.training
    inputs = np.random.default_rng(0).normal(size=(5, 1, 16, 16)).astype(np.float32)
    cpu = torch.device("cpu")
    np.testing.assert_array_equal(
        predict_proba(loaded, inputs, cpu), predict_proba(model, inputs, cpu)
    )
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_latest_moves_with_each_save(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    first = save_checkpoint(tmp_path, _trained_model(0), _spec("1-a"))
    assert latest_checkpoint(tmp_path) == first
    second = save_checkpoint(tmp_path, _trained_model(1), _spec("2-b"))
    assert latest_checkpoint(tmp_path) == second
    assert (tmp_path / LATEST).read_text().strip() == "2-b.pt"
    assert first.is_file()  # earlier versions stay for pinning back
    _, spec = load_checkpoint(tmp_path)  # a directory loads its latest
    assert spec.version == "2-b"


def test_unusable_checkpoints_are_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="cannot name"):
        save_checkpoint(tmp_path, _trained_model(0), _spec("../escape"))
    # A spec that does not match the weights does not load silently.
    path = save_checkpoint(tmp_path, _trained_model(0), _spec("3-c"))
    payload = torch.load(path, weights_only=True)
    payload["spec"] = _spec("3-c").model_copy(update={"classes": ["a", "b", "c"]}).model_dump_json()
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="does not rebuild"):
        load_checkpoint(path)
