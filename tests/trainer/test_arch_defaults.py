"""The first model's defaults: pretrained EfficientNet-Lite0 for camera-sized frames."""

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from trainer.arch_defaults import PRETRAINED_MIN_INPUT, default_arch, default_pretrained
from trainer.architectures import pretrained_weights_path
from trainer.config import TrainerSettings
from trainer.lineage import initial_model


def test_input_size_picks_the_architecture() -> None:
    assert default_arch(PRETRAINED_MIN_INPUT - 1) == "small-cnn"
    assert default_arch(PRETRAINED_MIN_INPUT) == "efficientnet_lite0"
    assert default_arch((480, 40)) == "small-cnn"  # the smaller side decides
    assert default_pretrained("efficientnet_lite0", has_weights=False)
    assert not default_pretrained("efficientnet_lite0", has_weights=True)
    assert not default_pretrained("resnet18", has_weights=False)


def test_trainer_settings_resolve_the_first_model(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (TrainerSettings().first_arch, TrainerSettings().first_pretrained) == (
        "small-cnn",
        False,
    )
    camera = TrainerSettings(input_size=224)
    assert (camera.arch, camera.first_arch, camera.first_pretrained) == (
        None,
        "efficientnet_lite0",
        True,
    )
    monkeypatch.setenv("WINNOW_TRAINER_PRETRAINED", "false")
    assert not TrainerSettings(input_size=224).first_pretrained
    monkeypatch.delenv("WINNOW_TRAINER_PRETRAINED")
    local = TrainerSettings(input_size=224, init_weights=Path("w.pth"))
    assert not local.first_pretrained  # a local checkpoint takes the packaged weights' place
    assert TrainerSettings(input_size=224, arch="resnet18").first_arch == "resnet18"


def test_trainer_settings_refuse_conflicts() -> None:
    with pytest.raises(ValidationError, match="not both"):
        TrainerSettings(input_size=224, pretrained=True, init_weights=Path("w.pth"))
    with pytest.raises(ValidationError, match="no packaged pretrained weights for small-cnn"):
        TrainerSettings(input_size=32, pretrained=True)
    with pytest.raises(ValidationError, match="unknown architecture"):
        TrainerSettings(arch="vgg99")


def test_cold_start_of_a_camera_sized_trainer_is_pretrained(tmp_path: Path) -> None:
    settings = TrainerSettings(data_dir=tmp_path, classes=["normal", "polyp"], input_size=96)
    model, spec, fresh = initial_model(settings)
    assert fresh and spec.arch == "efficientnet_lite0" and spec.embedding_dim == 1280
    assert spec.mean == [127 / 255] * 3 and spec.std == [128 / 255] * 3
    state = torch.load(pretrained_weights_path("efficientnet_lite0"), weights_only=True)
    torch.testing.assert_close(model.backbone.net._conv_head.weight, state["_conv_head.weight"])
    assert model.head.out_features == 2
