"""``winnow model init``: a fresh model becomes one ONNX file that follows the contract."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from schemas.model_spec import (
    INPUT_NAME,
    OUTPUT_EMBEDDING,
    OUTPUT_PROBABILITIES,
    SPEC_KEY,
    ModelSpec,
)
from tests.trainer.helpers import digit_spec
from trainer import export
from trainer.architectures import build_model
from trainer.errors import ModelBuildError, ModelExportError, TrainerError
from trainer.export import check_parity, export_onnx
from trainer.model_init import init_model

CASES = [
    # arch, channels, input size, classes
    ("small-cnn", 1, 8, [str(d) for d in range(10)]),
    ("resnet18", 3, 64, ["normal", "pneumonia", "other"]),
    ("mobilenet_v3_small", 3, 64, ["cat", "dog"]),
    ("efficientnet_lite0", 1, 64, ["normal", "polyp"]),
]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def initialized(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    arch, channels, size, classes = request.param
    path = tmp_path_factory.mktemp(arch) / "model.onnx"
    spec = init_model(classes, size, arch, path, channels=channels, seed=0)
    return spec, path


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_init_writes_one_loadable_file_with_the_spec(initialized, tmp_path: Path) -> None:
    spec, path = initialized
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no external data
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    metadata = {p.key: p.value for p in proto.metadata_props}
    stored = ModelSpec.model_validate(json.loads(metadata[SPEC_KEY]))
    assert stored == spec
    assert stored.version.startswith("0-init-") and len(stored.version) == len("0-init-") + 8
    assert stored.labels_trained == 0
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert [o.name for o in proto.graph.output] == [OUTPUT_PROBABILITIES, OUTPUT_EMBEDDING]


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch_and_probabilities(initialized, batch: int) -> None:
    spec, path = initialized
    x = np.random.default_rng(0).normal(size=(batch, spec.channels, *spec.input_size))
    probabilities, embedding = _session(path).run(None, {INPUT_NAME: x.astype(np.float32)})
    assert probabilities.shape == (batch, len(spec.classes))
    assert embedding.shape == (batch, spec.embedding_dim)
    assert probabilities.dtype == np.float32 and embedding.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities >= 0).all()


def test_onnx_matches_torch(initialized) -> None:
    spec, path = initialized
    torch.manual_seed(0)  # init_model seeds with 0: the same weights again
    model = build_model(spec.arch, len(spec.classes), spec.channels)
    assert check_parity(model, path, spec, atol=1e-4, batch=3) <= 1e-4


def test_same_seed_same_version_other_seed_other_version(tmp_path: Path) -> None:
    args = (["a", "b"], 8, "small-cnn")
    first = init_model(*args, tmp_path / "a.onnx", channels=1, seed=0)
    again = init_model(*args, tmp_path / "b.onnx", channels=1, seed=0)
    other = init_model(*args, tmp_path / "c.onnx", channels=1, seed=1)
    assert first.version == again.version != other.version
    assert first.mean == [0.5] and first.std == [0.5]


def test_parity_failure_is_a_clear_error(tmp_path: Path) -> None:
    spec = init_model(["a", "b"], 8, "small-cnn", tmp_path / "m.onnx", channels=1, seed=0)
    torch.manual_seed(99)
    different = build_model("small-cnn", 2, 1)
    with pytest.raises(ModelExportError, match="differs between torch and onnxruntime"):
        check_parity(different, tmp_path / "m.onnx", spec)
    assert issubclass(ModelExportError, TrainerError) and not ModelExportError.retriable


def test_export_keeps_training_mode_and_round_trips(tmp_path: Path) -> None:
    model = build_model("small-cnn", 3, 3).train()
    spec = ModelSpec(
        version="v1",
        arch="small-cnn",
        classes=["a", "b", "c"],
        input_size=(12, 20),
        channels=3,
        mean=[0.1, 0.2, 0.3],
        std=[0.5, 0.5, 0.5],
        embedding_dim=model.embedding_dim,
    )
    export_onnx(model, spec, tmp_path / "m.onnx")
    assert model.training
    x = np.zeros((2, 3, 12, 20), dtype=np.float32)
    probabilities, _ = _session(tmp_path / "m.onnx").run(None, {INPUT_NAME: x})
    assert probabilities.shape == (2, 3)


def test_dynamo_exporter_is_the_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def gone(*args: object) -> None:
        raise TypeError("dynamo=False is no longer supported")

    monkeypatch.setattr(export, "_export_torchscript", gone)
    spec = init_model(["a", "b"], 8, "small-cnn", tmp_path / "m.onnx", channels=1, seed=0)
    x = np.zeros((3, 1, 8, 8), dtype=np.float32)
    probabilities, embedding = _session(tmp_path / "m.onnx").run(None, {INPUT_NAME: x})
    assert probabilities.shape == (3, 2) and embedding.shape == (3, spec.embedding_dim)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_local_torchvision_checkpoint_loads_for_gray_input(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    torch.manual_seed(5)
    reference = resnet18(weights=None)  # stands in for an ImageNet checkpoint: 1000 classes
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = build_model("resnet18", 2, 1, weights=tmp_path / "resnet18.pth")
    torch.testing.assert_close(
        model.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight
    )
    torch.testing.assert_close(
        model.backbone.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True)
    )
    assert model.head.out_features == 2


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelBuildError, match="unknown architecture"):
        init_model(["a", "b"], 8, "vgg99", tmp_path / "m.onnx")
    with pytest.raises(ModelBuildError, match="at least 8x8"):
        init_model(["a", "b"], 4, "small-cnn", tmp_path / "m.onnx")


def _spec_of(path: Path) -> ModelSpec:
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return ModelSpec.from_onnx_metadata(metadata)


def test_cli_default_is_pretrained_efficientnet_for_camera_sized_input(tmp_path: Path) -> None:
    from winnow import cli

    argv = ["model", "init", "--classes", "normal,polyp", "--channels", "1"]
    assert cli.main([*argv, "--input-size", "64", "--out", str(tmp_path / "big.onnx")]) == 0
    assert cli.main([*argv, "--input-size", "32", "--out", str(tmp_path / "small.onnx")]) == 0
    big, small = _spec_of(tmp_path / "big.onnx"), _spec_of(tmp_path / "small.onnx")
    assert (big.arch, big.mean, big.std) == ("efficientnet_lite0", [127 / 255], [128 / 255])
    assert (small.arch, small.mean) == ("small-cnn", [0.5])
    # The embedding does not depend on the head: it is the ImageNet backbone's.
    x = np.random.default_rng(0).normal(size=(2, 1, 64, 64)).astype(np.float32)
    _, embedding = _session(tmp_path / "big.onnx").run(None, {INPUT_NAME: x})
    with torch.no_grad():
        _, want = build_model("efficientnet_lite0", 2, 1, pretrained=True).eval()(
            torch.from_numpy(x)
        )
    np.testing.assert_allclose(embedding, want.numpy(), atol=1e-4)


def test_cli_refuses_pretrained_where_it_cannot_be(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from winnow import cli

    argv = ["model", "init", "--classes", "a,b", "--out", str(tmp_path / "m.onnx")]
    assert cli.main([*argv, "--arch", "resnet18", "--pretrained"]) == 2
    assert "no packaged pretrained weights for resnet18" in capsys.readouterr().err
    assert cli.main([*argv, "--pretrained", "--weights", str(tmp_path / "w.pth")]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def _initializer_types(path: Path) -> set[int]:
    """The element types of the graph's weights larger than a handful of values."""
    proto = onnx.load(str(path))
    return {t.data_type for t in proto.graph.initializer if np.prod(t.dims) > 16}


@pytest.mark.parametrize(("arch", "channels", "size"), [("small-cnn", 1, 16), ("resnet18", 3, 32)])
def test_fp16_computes_in_half_behind_a_float32_interface(
    tmp_path: Path, arch: str, channels: int, size: int
) -> None:
    """The failure it catches: an fp16 export that keeps float32 weights (nothing gained),
    changes the contract's float32 input or outputs, or drifts from the float32 model."""
    classes = ["a", "b", "c"]
    full = init_model(classes, size, arch, tmp_path / "fp32.onnx", channels=channels, seed=3)
    half = init_model(
        classes, size, arch, tmp_path / "fp16.onnx", channels=channels, seed=3, precision="fp16"
    )
    assert (full.precision, half.precision) == ("fp32", "fp16")
    assert _spec_of(tmp_path / "fp16.onnx") == half
    assert _initializer_types(tmp_path / "fp16.onnx") == {onnx.TensorProto.FLOAT16}
    assert _initializer_types(tmp_path / "fp32.onnx") == {onnx.TensorProto.FLOAT}
    ratio = (tmp_path / "fp16.onnx").stat().st_size / (tmp_path / "fp32.onnx").stat().st_size
    assert 0.45 < ratio < 0.6
    x = np.random.default_rng(0).normal(size=(5, channels, size, size)).astype(np.float32)
    got = _session(tmp_path / "fp16.onnx").run(None, {INPUT_NAME: x})
    want = _session(tmp_path / "fp32.onnx").run(None, {INPUT_NAME: x})
    assert all(o.dtype == np.float32 for o in got)
    np.testing.assert_allclose(got[0], want[0], atol=export.FP16_TOLERANCE)
    assert np.abs(got[1] - want[1]).max() <= export.FP16_TOLERANCE * np.abs(want[1]).max()
    assert not np.array_equal(got[0], want[0])  # it really computed in half precision


def test_fp16_parity_refuses_a_model_that_overflows_in_half(tmp_path: Path) -> None:
    """The failure it catches: a release whose float16 activations overflow (65,504 is
    float16's largest value) served with NaN probabilities instead of refused at export."""
    torch.manual_seed(0)
    model = build_model("small-cnn", 10, 1).eval()
    with torch.no_grad():
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        first.weight.mul_(1e7)
    spec = digit_spec("v1")
    export_onnx(model, spec, tmp_path / "fp32.onnx")
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, want = model(x)
    _, got = _session(tmp_path / "fp32.onnx").run(None, {INPUT_NAME: x.numpy()})
    assert np.abs(got - want.numpy()).max() <= 1e-5 * np.abs(want.numpy()).max()  # fp32 is fine
    assert np.abs(want.numpy()).max() > 65504  # beyond float16's range
    half = spec.model_copy(update={"precision": "fp16"})
    export_onnx(model, half, tmp_path / "fp16.onnx")
    with pytest.raises(ModelExportError, match="does not keep its accuracy in float16"):
        check_parity(model, tmp_path / "fp16.onnx", half)


def test_cli_writes_fp16_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from winnow import cli

    argv = ["model", "init", "--classes", "a,b", "--input-size", "16", "--channels", "1"]
    assert cli.main([*argv, "--precision", "fp16", "--out", str(tmp_path / "m.onnx")]) == 0
    assert ", fp16, version" in capsys.readouterr().out
    assert _spec_of(tmp_path / "m.onnx").precision == "fp16"
    assert cli.main([*argv, "--out", str(tmp_path / "d.onnx")]) == 0
    assert _spec_of(tmp_path / "d.onnx").precision == "fp32"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_model_trained_on_the_gpu_exports_and_passes_parity(
    tmp_path: Path, precision: str
) -> None:
    """The failure it catches: a trainer on a GPU (``WINNOW_TRAINER_DEVICE=cuda``) whose
    every full release fails, because the export traces a model on the GPU with an example
    on the CPU; and an export that moves the trainer's own model off the GPU."""
    torch.manual_seed(0)
    model = build_model("small-cnn", 10, 1).cuda()
    spec = digit_spec("v1").model_copy(update={"precision": precision})
    export_onnx(model, spec, tmp_path / "m.onnx")
    assert check_parity(model, tmp_path / "m.onnx", spec) <= export.FP16_TOLERANCE
    assert next(model.parameters()).device.type == "cuda"


def test_a_model_on_the_cpu_is_exported_as_it_is() -> None:
    model = build_model("small-cnn", 2, 1)
    assert export.on_cpu(model) is model
