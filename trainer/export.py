"""Exports a torch model to one self-contained ONNX file that follows the contract.

The graph has the input ``image`` (N x C x H x W, N dynamic) and the outputs
``probabilities`` and ``embedding``; the ``ModelSpec`` goes into the metadata
under ``winnow.spec``. ``check_parity`` proves that onnxruntime computes what
torch computes.

With ``spec.precision`` fp16 the graph computes in float16 between a cast of the
input and casts of the outputs, so its interface stays float32 and the scorer
feeds it as any other; the file is half the size. Float16 is for GPUs (tensor
cores); measured with one thread on this project's 2-core CPU machine, ONNX
Runtime's CPU provider ran ResNet-18 at 224 at 30 frames/s in fp16 against 42 in
fp32 and EfficientNet-Lite0 at 24 against 72, the small CNN about equal.
Its parity with torch's float32 model is checked with wider tolerances
(:data:`FP16_TOLERANCE`).
"""

import copy
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from schemas.model_spec import (
    HEAD_KEY,
    INPUT_NAME,
    OUTPUT_EMBEDDING,
    OUTPUT_PROBABILITIES,
    ModelSpec,
)
from trainer.errors import ModelExportError

log = logging.getLogger(__name__)

OPSET = 17
_BATCH = "batch"

FP32_TOLERANCE = 1e-4
"""Largest absolute difference between torch and onnxruntime on either output, fp32."""
FP16_TOLERANCE = 1e-2
"""fp16 against torch's float32 model: the largest absolute difference of a probability,
and of an embedding value relative to the embedding's largest magnitude. Measured on
random inputs: ResNet-18 at 224 4e-4 (probabilities) and 6e-4 (embedding, relative), the
small CNN 7e-6 and 4e-4; float16 keeps about three decimal digits."""


class HalfPrecision(nn.Module):
    """``model`` computing in float16 behind a float32 interface (a copy; ``model`` is kept).

    The export traces it: a cast of the input, the half-precision graph, casts of the
    outputs. BatchNorm statistics and every weight become float16.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = copy.deepcopy(model).half().eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities, embedding = self.inner(x.half())
        return probabilities.float(), embedding.float()


def export_onnx(model: nn.Module, spec: ModelSpec, path: Path) -> None:
    """Writes ``model`` in eval mode to ``path`` as one ONNX file with ``spec`` in its metadata.

    Raises:
        ModelExportError: the exporter failed or the result does not pass
            ``onnx.checker``.
    """
    height, width = spec.input_size
    example = torch.zeros(2, spec.channels, height, width)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            traced = on_cpu(model)
            traced = HalfPrecision(traced) if spec.precision == "fp16" else traced
            try:
                proto = _export_torchscript(traced, example)
            except Exception as legacy:  # the exporter raises many kinds
                log.warning("TorchScript ONNX export failed, trying dynamo: %s", legacy)
                try:
                    proto = _export_dynamo(traced, example)
                except Exception as exc:
                    raise ModelExportError(
                        f"torch.onnx.export failed for {spec.arch}: {legacy}; "
                        f"the dynamo exporter failed too: {exc}"
                    ) from exc
    finally:
        model.train(was_training)
    for key, value in spec.to_onnx_metadata().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    head = head_metadata(model)
    if head is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = HEAD_KEY, head
    proto.producer_name = "winnow"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ModelExportError(f"the exported {spec.arch} graph is not valid ONNX: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(proto.SerializeToString())
    tmp.replace(path)  # readers never see half a file


def on_cpu(model: nn.Module) -> nn.Module:
    """``model`` itself when its weights are on the CPU, else a CPU copy of it.

    A trainer on a GPU keeps its model there; the export traces and the parity check
    runs on the CPU (the release must run on any scorer), and the copy leaves the
    trainer's model where it is.
    """
    if all(p.device.type == "cpu" for p in model.parameters()):
        return model
    return copy.deepcopy(model).cpu()


def head_metadata(model: nn.Module) -> str | None:
    """JSON of the head's weight, bias and the dropout before it, or None for another model.

    WinnowNet's only dropout sits between the embedding and the linear head, so
    the scorer gets exact MC-dropout samples from the embedding output and
    these weights, without a second, stochastic ONNX graph.
    """
    import json

    head, dropout = getattr(model, "head", None), getattr(model, "dropout", None)
    if not isinstance(head, nn.Linear) or not isinstance(dropout, nn.Dropout):
        return None
    return json.dumps(
        {
            "weight": head.weight.detach().cpu().double().numpy().round(7).tolist(),
            "bias": head.bias.detach().cpu().double().numpy().round(7).tolist(),
            "dropout": float(dropout.p),
        }
    )


_DYNAMIC_AXES = {
    INPUT_NAME: {0: _BATCH},
    OUTPUT_PROBABILITIES: {0: _BATCH},
    OUTPUT_EMBEDDING: {0: _BATCH},
}


def _export_torchscript(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """The TorchScript exporter: deprecated, but fast and a plain single-file graph."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
        # EfficientNet-Lite computes its "same" padding from the input's height
        # and width; the tracer records it as constants, which is right because
        # the spec fixes both. A size-derived constant that should not be one
        # (the batch) fails check_parity, which runs another batch size.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            buffer,  # type: ignore[arg-type]  # the TorchScript path takes a file object
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_PROBABILITIES, OUTPUT_EMBEDDING],
            dynamic_axes=_DYNAMIC_AXES,
            opset_version=OPSET,
        )
    return onnx.load_from_string(buffer.getvalue())


def _export_dynamo(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """The torch.export-based exporter, for torch versions without the TorchScript one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            verbose=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_PROBABILITIES, OUTPUT_EMBEDDING],
            dynamic_shapes=({0: torch.export.Dim(_BATCH)},),
            external_data=False,
            opset_version=max(OPSET, 18),
        )
    if program is None:
        raise ModelExportError("the dynamo exporter returned no program")
    return program.model_proto


def check_parity(
    model: nn.Module, path: Path, spec: ModelSpec, atol: float | None = None, batch: int = 4
) -> float:
    """Runs torch and onnxruntime (CPU) on one random batch and compares both outputs.

    Torch runs ``model`` in float32 whatever ``spec.precision``: an fp16 graph must
    compute what the float32 model does, within :data:`FP16_TOLERANCE`.

    Args:
        atol: the tolerance; default :data:`FP32_TOLERANCE`, or :data:`FP16_TOLERANCE`
            for an fp16 graph (where the embedding's is relative to its largest value).

    Returns:
        The largest difference over probabilities and embedding (the embedding's
        relative for fp16).

    Raises:
        ModelExportError: the difference exceeds the tolerance or shapes differ.
    """
    half = spec.precision == "fp16"
    if atol is None:
        atol = FP16_TOLERANCE if half else FP32_TOLERANCE
    height, width = spec.input_size
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(batch, spec.channels, height, width, generator=generator)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = [t.numpy() for t in on_cpu(model)(x)]
    finally:
        model.train(was_training)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    got = session.run([OUTPUT_PROBABILITIES, OUTPUT_EMBEDDING], {INPUT_NAME: x.numpy()})
    worst = 0.0
    for name, want, have in zip(
        (OUTPUT_PROBABILITIES, OUTPUT_EMBEDDING), expected, got, strict=True
    ):
        if want.shape != have.shape:
            raise ModelExportError(
                f"'{name}' has shape {have.shape} in ONNX but {want.shape} in torch ({path})"
            )
        diff = float(np.max(np.abs(want - have))) if want.size else 0.0
        relative = half and name == OUTPUT_EMBEDDING
        if relative:
            diff /= max(float(np.max(np.abs(want))), 1e-6) if want.size else 1.0
        if not diff <= atol:  # also catches NaN
            measure = "relative to its largest value " if relative else ""
            raise ModelExportError(
                f"'{name}' differs between torch and onnxruntime by {diff:.3g} {measure}"
                f"(tolerance {atol:.3g}, {spec.precision}) for {spec.arch} at {path}"
                + ("; this model does not keep its accuracy in float16, use fp32" if half else "")
            )
        worst = max(worst, diff)
    return worst
