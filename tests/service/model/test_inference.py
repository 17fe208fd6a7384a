"""Loading ONNX models against the contract, and running them."""

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from schemas.model_spec import SPEC_KEY, ModelSpec
from service.errors import ModelError
from service.model.inference import (
    CPU,
    CUDA,
    RUN_ROWS,
    OnnxModel,
    cuda_usable,
    padded_rows,
    provider_entries,
    run_rows,
    select_providers,
)


def _with_metadata(path: Path, spec_json: str | None) -> bytes:
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    if spec_json is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = SPEC_KEY, spec_json
    return proto.SerializeToString()


def _spec_of(path: Path) -> ModelSpec:
    proto = onnx.load(str(path))
    return ModelSpec.from_onnx_metadata({p.key: p.value for p in proto.metadata_props})


def test_load_and_run(digits_model_path: Path) -> None:
    model = OnnxModel.load(digits_model_path, device="cpu", intra_op_threads=1)
    assert model.provider == "CPUExecutionProvider"
    assert model.spec == _spec_of(digits_model_path)
    assert model.version == model.spec.version and model.version.startswith("0-init-")
    model.warm_up(2)
    batch = np.random.default_rng(0).normal(size=(5, 1, 16, 16)).astype(np.float32)
    probabilities, embedding = model.run(batch)
    assert probabilities.shape == (5, 10) and probabilities.dtype == np.float32
    assert embedding.shape == (5, model.spec.embedding_dim) and embedding.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    single, _ = model.run(batch[:1])
    np.testing.assert_allclose(single[0], probabilities[0], atol=1e-5)


def test_many_frames_are_scored_a_few_rows_a_run(digits_model_path: Path) -> None:
    """The drift anchor and the exemplars are scored ``RUN_ROWS`` at a time: one run of
    1,000 frames would leave the session's arena 59 MB larger for its whole life."""
    model = OnnxModel.load(digits_model_path, device="cpu", intra_op_threads=1)
    rows: list[int] = []

    class Counted:
        def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            rows.append(len(batch))
            return model.run(batch)

    batch = np.random.default_rng(1).normal(size=(150, 1, 16, 16)).astype(np.float32)
    probabilities, embedding = run_rows(Counted(), batch)
    assert rows == [RUN_ROWS, RUN_ROWS, 150 - 2 * RUN_ROWS]
    whole_probabilities, whole_embedding = model.run(batch)
    np.testing.assert_allclose(probabilities, whole_probabilities, atol=1e-5)
    np.testing.assert_allclose(embedding, whole_embedding, atol=1e-5)
    rows.clear()
    few, _ = run_rows(Counted(), batch[:3])
    assert rows == [3] and few.shape == (3, 10)


def test_empty_batch(digits_model_path: Path) -> None:
    model = OnnxModel.load(digits_model_path.read_bytes(), device="cpu")
    probabilities, embedding = model.run(np.empty((0, 1, 16, 16), dtype=np.float32))
    assert probabilities.shape == (0, 10) and embedding.shape == (0, model.spec.embedding_dim)


def test_wrong_batch_shape_is_refused(digits_model_path: Path) -> None:
    model = OnnxModel.load(digits_model_path, device="cpu")
    with pytest.raises(ValueError, match="expected a batch of shape"):
        model.run(np.zeros((2, 3, 16, 16), dtype=np.float32))


def test_missing_spec(digits_model_path: Path) -> None:
    with pytest.raises(ModelError, match="no valid spec"):
        OnnxModel.load(_with_metadata(digits_model_path, None), device="cpu")
    with pytest.raises(ModelError, match="no valid spec"):
        OnnxModel.load(_with_metadata(digits_model_path, "{not json"), device="cpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input_size": (28, 28)}, "axis 2"),
        ({"channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3}, "axis 1"),
        ({"classes": ["a", "b", "c"]}, "'probabilities'"),
        ({"embedding_dim": 7}, "'embedding'"),
    ],
)
def test_spec_that_does_not_match_the_graph(
    digits_model_path: Path, change: dict, message: str
) -> None:
    wrong = _spec_of(digits_model_path).model_copy(update=change)
    with pytest.raises(ModelError, match=message):
        OnnxModel.load(_with_metadata(digits_model_path, wrong.model_dump_json()), device="cpu")


def test_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot load"):
        OnnxModel.load(b"not an onnx file", device="cpu")
    with pytest.raises(ModelError, match="cannot read"):
        OnnxModel.load(tmp_path / "missing.onnx", device="cpu")


def test_providers() -> None:
    assert select_providers("cpu") == ["CPUExecutionProvider"]
    auto = select_providers("auto")
    assert auto[-1] == "CPUExecutionProvider"
    assert ("CUDAExecutionProvider" in auto) == cuda_usable()[0]


@pytest.mark.skipif(cuda_usable()[0], reason="this machine has a usable CUDA device")
def test_cuda_requested_without_gpu() -> None:
    with pytest.raises(ModelError, match="CUDA cannot be used here"):
        select_providers("cuda")
    assert select_providers("auto") == ["CPUExecutionProvider"]


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_usable()[0], reason="no usable CUDA device")
def test_runs_on_cuda_like_on_cpu(digits_model_path: Path) -> None:
    gpu = OnnxModel.load(digits_model_path, device="cuda")
    cpu = OnnxModel.load(digits_model_path, device="cpu")
    assert gpu.provider == "CUDAExecutionProvider"
    batch = np.random.default_rng(0).normal(size=(8, 1, 16, 16)).astype(np.float32)
    for on_gpu, on_cpu in zip(gpu.run(batch), cpu.run(batch), strict=True):
        np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-3)


def _seen_shapes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The input shapes every ONNX Runtime session runs from now on."""
    seen: list[tuple[int, ...]] = []
    real_run = ort.InferenceSession.run

    def run(self: ort.InferenceSession, outputs: Any, feed: dict[str, np.ndarray], *a: Any) -> Any:
        seen.extend(tuple(value.shape) for value in feed.values())
        return real_run(self, outputs, feed, *a)

    monkeypatch.setattr(ort.InferenceSession, "run", run)
    return seen


def test_padded_rows_are_powers_of_two() -> None:
    assert [padded_rows(n) for n in (0, 1, 2, 3, 5, 8, 33, 64, 65)] == [
        1,
        1,
        2,
        4,
        8,
        8,
        64,
        64,
        128,
    ]


def test_padded_batches_give_the_frames_own_results(
    digits_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where batches are padded (CUDA), a batch of 5 runs as 8 and answers for its 5."""
    plain = OnnxModel.load(digits_model_path, device="cpu", intra_op_threads=1)
    padded = OnnxModel(plain._session, plain.spec, pad_batches=True)
    batch = np.random.default_rng(2).normal(size=(5, 1, 16, 16)).astype(np.float32)
    expected = plain.run(batch)
    seen = _seen_shapes(monkeypatch)

    probabilities, embedding = padded.run(batch)

    assert [shape[0] for shape in seen] == [8]
    assert probabilities.shape == (5, 10) and embedding.shape == (5, plain.spec.embedding_dim)
    np.testing.assert_allclose(probabilities, expected[0], atol=1e-5)
    np.testing.assert_allclose(embedding, expected[1], atol=1e-5)
    assert padded.run(batch[:0])[0].shape == (0, 10)


def test_warm_up_runs_every_padded_size_where_batches_are_padded(
    digits_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = OnnxModel.load(digits_model_path, device="cpu", intra_op_threads=1)
    padded = OnnxModel(plain._session, plain.spec, pad_batches=True)
    seen = _seen_shapes(monkeypatch)

    plain.warm_up(3)
    assert [shape[0] for shape in seen] == [3]  # the CPU: one batch, as asked
    seen.clear()
    padded.warm_up(3)
    assert [shape[0] for shape in seen] == [1, 2, 4, 8, 16, 32, RUN_ROWS]
    seen.clear()
    padded.warm_up(100)
    assert [shape[0] for shape in seen][-2:] == [64, 128]


def test_cpu_models_are_not_padded_and_cuda_gets_its_options(
    digits_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA provider is asked for HEURISTIC cuDNN search (no GPU here: the session is
    made on the CPU and only the arguments are checked)."""
    import service.model.inference as inference

    assert not OnnxModel.load(digits_model_path, device="cpu")._pad
    asked: list[Any] = []
    real_init = ort.InferenceSession.__init__

    def init(self: ort.InferenceSession, data: Any, options: Any, providers: Any) -> None:
        asked.append(providers)
        real_init(self, data, options, providers=[CPU])

    monkeypatch.setattr(inference, "select_providers", lambda device: [CUDA, CPU])
    monkeypatch.setattr(ort.InferenceSession, "__init__", init)
    OnnxModel.load(digits_model_path, device="auto")

    assert asked == [[(CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}), CPU]]
    assert provider_entries([CPU]) == [CPU]


def test_an_fp16_model_on_the_cpu_is_served_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The failure it catches: an fp16 release (meant for GPUs) slowing a CPU scorer with no
    word in its log, or that word repeated at every model swap."""
    from service.model import inference
    from trainer.model_init import init_model

    inference._warn_fp16_on_cpu.cache_clear()
    init_model(["a", "b"], 16, "small-cnn", tmp_path / "h.onnx", channels=1, precision="fp16")
    init_model(["a", "b"], 16, "small-cnn", tmp_path / "f.onnx", channels=1)
    with caplog.at_level("INFO", logger="service.model.inference"):
        full = OnnxModel.load(tmp_path / "f.onnx", device="cpu")
        assert "precision=fp32" in caplog.text and "fp16 model" not in caplog.text
        for _ in range(3):  # swaps
            half = OnnxModel.load(tmp_path / "h.onnx", device="cpu")
    assert caplog.text.count("an fp16 model runs on the CPU") == 1
    assert "precision=fp16" in caplog.text
    batch = np.random.default_rng(0).normal(size=(3, 1, 16, 16)).astype(np.float32)
    got, want = half.run(batch), full.run(batch)
    assert got[0].dtype == got[1].dtype == np.float32
    np.testing.assert_allclose(got[0], want[0], atol=1e-2)
