"""ONNX Runtime inference for models that follow the contract in ``schemas.model_spec``.

``OnnxModel.load`` reads the ``ModelSpec`` from the file's metadata and checks
the graph against it, so a model that loads is a model the scorer can feed.
CUDA is used when a CUDA device is really usable, CPU otherwise.
"""

import ctypes
import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError

from schemas.model_spec import (
    INPUT_NAME,
    OUTPUT_EMBEDDING,
    OUTPUT_PROBABILITIES,
    ModelSpec,
)
from service.errors import ModelError

log = logging.getLogger(__name__)


class Runnable(Protocol):
    """Anything that scores a batch as :meth:`OnnxModel.run` does."""

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}
"""The CUDA provider's options. ONNX Runtime's default search, EXHAUSTIVE, benchmarks every
cuDNN convolution algorithm on the first run of each new input shape. Measured on an H200
(ResNet-18, onnxruntime-gpu 1.31): 90 to 195 ms for each new batch size, against 35 ms with
HEURISTIC and the same speed afterwards (batch 64: 9,484 and 10,660 frames/s). The scorer's
batches take every size up to its largest, so EXHAUSTIVE stalled it again and again."""

RUN_ROWS = 64
"""Rows per run when many frames are scored at once (the scorer's exemplars, the drift
monitor's anchor frames): an ONNX Runtime session's memory arena grows to the largest
batch it has run and keeps that for the session's life. Measured on the 16 x 16 small
CNN: one run of 1,000 frames left the session 59 MB larger until it was dropped; in a
soak the scorer held those 60 MB from each backbone's drift anchor to the next."""

Device = Literal["auto", "cpu", "cuda"]


def select_providers(device: Device) -> list[str]:
    """Returns the ONNX Runtime providers to use, best first.

    ``onnxruntime-gpu`` lists the CUDA provider even where no GPU or driver
    is present, so "usable" is proven by a tiny probe session (once per
    process).

    Raises:
        ModelError: ``cuda`` was asked for but no CUDA device is usable.
    """
    if device == "cpu":
        return [CPU]
    if device not in ("auto", "cuda"):
        raise ModelError(f"unknown device '{device}'; choose auto, cpu or cuda")
    usable, why = cuda_usable()
    if usable:
        return [CUDA, CPU]
    if device == "cuda":
        raise ModelError(f"device 'cuda' was requested but CUDA cannot be used here: {why}")
    return [CPU]


def provider_entries(providers: list[str]) -> list[str | tuple[str, dict[str, str]]]:
    """``providers`` as ONNX Runtime takes them, CUDA with :data:`CUDA_OPTIONS`."""
    return [(name, dict(CUDA_OPTIONS)) if name == CUDA else name for name in providers]


def padded_rows(rows: int) -> int:
    """The batch size a CUDA run pads ``rows`` to: the next power of two.

    A handful of input shapes instead of one per batch size, each warmed up once
    (:meth:`OnnxModel.warm_up`), so no batch in the stream pays for a new shape.
    """
    return 1 if rows <= 1 else 1 << (rows - 1).bit_length()


@functools.cache
def cuda_usable() -> tuple[bool, str]:
    """Whether the CUDA provider really runs here, and if not, why."""
    if CUDA not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDAExecutionProvider"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False, "the NVIDIA driver (libcuda.so.1) is not installed"
    try:
        # Loads the CUDA and cuDNN libraries of the nvidia-* wheels (which
        # torch also uses), so that no LD_LIBRARY_PATH is needed.
        ort.preload_dlls(msvc=False)
    except Exception as exc:  # best effort; the probe below decides
        log.debug("onnxruntime.preload_dlls failed: %s", exc)
    try:
        session = ort.InferenceSession(
            _probe_model(), _session_options(None), providers=provider_entries([CUDA, CPU])
        )
    except Exception as exc:  # onnxruntime raises its own pybind error kinds
        return False, f"a probe session failed: {exc}"
    if CUDA not in session.get_providers():
        return False, "onnxruntime could not start the CUDA provider (see its log for why)"
    return True, "ok"


class OnnxModel:
    """A loaded ONNX model, its spec, and the provider that runs it."""

    def __init__(
        self, session: ort.InferenceSession, spec: ModelSpec, pad_batches: bool | None = None
    ) -> None:
        """``pad_batches``: run batches padded to :func:`padded_rows`; None: on CUDA only
        (on the CPU the padding would cost as much as the frames)."""
        self._session = session
        self._spec = spec
        self._provider = session.get_providers()[0]
        self._metadata = dict(session.get_modelmeta().custom_metadata_map)
        self._pad = self._provider == CUDA if pad_batches is None else pad_batches

    @classmethod
    def load(
        cls, source: Path | bytes, device: Device = "auto", intra_op_threads: int | None = None
    ) -> "OnnxModel":
        """Loads a model from a file or bytes and checks it against its spec.

        Args:
            source: an ``.onnx`` path or the file's bytes.
            device: ``auto`` (CUDA when usable), ``cpu`` or ``cuda``.
            intra_op_threads: CPU threads per inference; None lets onnxruntime
                choose (one per physical core).

        Raises:
            ModelError: the file cannot be read or parsed, has no valid spec,
                or its graph does not match the spec.
        """
        name = str(source) if isinstance(source, Path) else f"<{len(source)} bytes>"
        try:
            data = source.read_bytes() if isinstance(source, Path) else source
        except OSError as exc:
            raise ModelError(f"cannot read the model file {name}: {exc}") from exc
        providers = select_providers(device)
        try:
            session = ort.InferenceSession(
                data, _session_options(intra_op_threads), providers=provider_entries(providers)
            )
        except Exception as exc:  # onnxruntime raises its own pybind error kinds
            raise ModelError(f"onnxruntime cannot load the model {name}: {exc}") from exc
        if device == "cuda" and CUDA not in session.get_providers():
            raise ModelError(f"the model {name} could not be placed on CUDA")
        metadata = session.get_modelmeta().custom_metadata_map
        try:
            spec = ModelSpec.from_onnx_metadata(metadata)
        except (ValueError, ValidationError) as exc:
            raise ModelError(f"the model {name} has no valid spec: {exc}") from exc
        _check_graph(session, spec, name)
        model = cls(session, spec)
        log.info(
            "model loaded version=%s arch=%s precision=%s provider=%s cpu_threads=%s",
            spec.version,
            spec.arch,
            spec.precision,
            model.provider,
            intra_op_threads or "onnxruntime-default",
        )
        if spec.precision == "fp16" and model.provider == CPU:
            _warn_fp16_on_cpu()
        return model

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def version(self) -> str:
        return self._spec.version

    @property
    def metadata(self) -> Mapping[str, str]:
        """The file's custom ONNX metadata: the spec, and the head where the trainer wrote it."""
        return self._metadata

    @property
    def provider(self) -> str:
        """The provider that actually runs the model, e.g. ``CPUExecutionProvider``."""
        return self._provider

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores a batch (N x C x H x W, normalized per the spec).

        Returns:
            ``(probabilities, embedding)``: float32 N x classes and N x D; N may be 0.

        Raises:
            ValueError: the batch does not have the spec's shape.
        """
        spec = self._spec
        expected = (spec.channels, *spec.input_size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ValueError(f"expected a batch of shape (N, {expected}), got {batch.shape}")
        if batch.shape[0] == 0:
            return (
                np.empty((0, len(spec.classes)), dtype=np.float32),
                np.empty((0, spec.embedding_dim), dtype=np.float32),
            )
        rows = batch.shape[0]
        size = padded_rows(rows) if self._pad else rows
        if size == rows:
            feed = np.ascontiguousarray(batch, dtype=np.float32)
        else:
            feed = np.empty((size, *batch.shape[1:]), dtype=np.float32)
            feed[:rows] = batch
            feed[rows:] = 0.0
        probabilities, embedding = self._session.run(
            [OUTPUT_PROBABILITIES, OUTPUT_EMBEDDING], {INPUT_NAME: feed}
        )
        return probabilities[:rows], embedding[:rows]

    def warm_up(self, batch_size: int = 1) -> None:
        """Runs batches of zeros so that the first real batches are not slow.

        On the CPU one batch of ``batch_size``; where batches are padded (CUDA), one of
        every padded size up to that of ``max(batch_size, RUN_ROWS)``, since each new
        shape costs the CUDA provider its setup once.
        """
        spec = self._spec
        shape = (spec.channels, *spec.input_size)
        sizes = [batch_size]
        if self._pad:
            largest = padded_rows(max(batch_size, RUN_ROWS))
            sizes = [1 << i for i in range(largest.bit_length())]
        for size in sizes:
            self.run(np.zeros((size, *shape), dtype=np.float32))


@functools.cache
def _warn_fp16_on_cpu() -> None:
    """Once per process (not at every swap): fp16 graphs run slower on the CPU provider."""
    log.warning(
        "an fp16 model runs on the CPU, where ONNX Runtime computes float16 slower than "
        "float32 (ResNet-18: 30 against 42 frames/s on one thread); fp16 is meant for GPUs: "
        "set WINNOW_TRAINER_PRECISION=fp32 for CPU scorers"
    )


def run_rows(
    model: Runnable, inputs: np.ndarray, rows: int = RUN_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """``model.run`` on ``inputs`` at most ``rows`` frames at a time (see ``RUN_ROWS``):
    the same ``(probabilities, embedding)`` as one run, without the arena of one run."""
    if len(inputs) <= rows:
        return model.run(inputs)
    outputs = [model.run(inputs[i : i + rows]) for i in range(0, len(inputs), rows)]
    return np.concatenate([p for p, _ in outputs]), np.concatenate([e for _, e in outputs])


def _session_options(intra_op_threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    # Decode threads share the cores: do not burn them spinning between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def _check_graph(session: ort.InferenceSession, spec: ModelSpec, name: str) -> None:
    """Raises ModelError where the graph's input or outputs disagree with the spec."""
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise ModelError(
            f"the model {name} must have exactly one input '{INPUT_NAME}', "
            f"it has {[i.name for i in inputs]}"
        )
    if inputs[0].type != "tensor(float)":
        raise ModelError(f"the input '{INPUT_NAME}' of {name} is {inputs[0].type}, not float32")
    _check_shape(name, INPUT_NAME, inputs[0].shape, [spec.channels, *spec.input_size])
    outputs = {o.name: o for o in session.get_outputs()}
    for output, size in (
        (OUTPUT_PROBABILITIES, len(spec.classes)),
        (OUTPUT_EMBEDDING, spec.embedding_dim),
    ):
        if output not in outputs:
            raise ModelError(f"the model {name} has no output '{output}'; it has {sorted(outputs)}")
        if outputs[output].type != "tensor(float)":
            raise ModelError(
                f"the output '{output}' of {name} is {outputs[output].type}, not float32"
            )
        _check_shape(name, output, outputs[output].shape, [size])


def _check_shape(model: str, tensor: str, shape: list[object], expected: list[int]) -> None:
    """The first dimension must be dynamic (the batch); fixed ones must equal ``expected``."""
    if len(shape) != len(expected) + 1:
        raise ModelError(
            f"'{tensor}' of {model} has {len(shape)} dimensions, "
            f"the spec needs {len(expected) + 1}: (N, {', '.join(map(str, expected))})"
        )
    if isinstance(shape[0], int):
        raise ModelError(
            f"'{tensor}' of {model} has a fixed batch size {shape[0]}; export it with a "
            f"dynamic batch dimension"
        )
    for axis, (got, want) in enumerate(zip(shape[1:], expected, strict=True), start=1):
        if isinstance(got, int) and got != want:
            raise ModelError(
                f"'{tensor}' of {model} has size {got} on axis {axis} "
                f"but the spec says {want} (shape {shape})"
            )


@functools.cache
def _probe_model() -> bytes:
    """A one-node graph (Identity) used to probe a provider."""
    import onnx
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [value("x", TensorProto.FLOAT, [1])],
        [value("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
