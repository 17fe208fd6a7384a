"""Head-only releases: a new linear head put on a kept full release's ONNX graph.

A head-only release carries the classification head alone
(:class:`~schemas.models.HeadArtifact`). The scorer serves it as one ONNX
file, so inference stays one ONNX Runtime call: the graph of the base
release, cut back to what computes ``embedding``, with the head appended as
``probabilities = Softmax(Gemm(embedding, weight, bias, transB=1))``, and the
head's spec and weights (``HEAD_KEY``, which MC dropout reads) in its
metadata. Every Winnow model applies its head to the embedding it outputs
(dropout is the identity at inference), so this is the model the trainer
released, whatever exporter wrote the base graph. Its spec names the base as
its ``backbone_version`` (the drift monitor keeps the embedding detector's
state across such swaps); one published before that field existed leaves it
unset, since the served spec must be the manifest's, and counts as a backbone
of its own.
"""

import json

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import ValidationError

from schemas.model_spec import HEAD_KEY, OUTPUT_EMBEDDING, OUTPUT_PROBABILITIES, SPEC_KEY
from schemas.models import HeadArtifact, ModelManifest
from service.errors import ModelError
from service.model.verification import ReleaseError

_WEIGHT = "winnow.head.weight"
_BIAS = "winnow.head.bias"
_LOGITS = "winnow.head.logits"


def parse_head(artifact: bytes) -> HeadArtifact:
    """The head of a head-only release.

    Raises:
        ModelError: the artifact is not a valid head (JSON in the ``model-head`` schema).
    """
    try:
        return HeadArtifact.model_validate_json(artifact)
    except ValidationError as exc:
        errors = exc.errors()
        first = f"{errors[0]['msg']} at {errors[0]['loc']}" if errors else str(exc)
        raise ModelError(f"the artifact is not a head: {first}") from exc


def head_metadata(head: HeadArtifact) -> str:
    """The ``HEAD_KEY`` metadata of a model with this head (what the trainer's export writes)."""
    return json.dumps({"weight": head.weight, "bias": head.bias, "dropout": head.dropout})


def apply_head(base: bytes, head: HeadArtifact) -> bytes:
    """The ONNX file of ``base`` with ``head`` as its classification head and spec.

    Args:
        base: the ONNX file of the head's base release.
        head: the new head, its spec and base version.

    Returns:
        The serialized model; load it like any release.

    Raises:
        ModelError: ``base`` does not parse, lacks the contract's outputs, or
            its embedding does not fit the head.
    """
    try:
        proto = onnx.load_from_string(base)
    except Exception as exc:  # protobuf raises its own DecodeError
        raise ModelError(f"the base model does not parse: {exc}") from exc
    graph = proto.graph
    outputs = [o.name for o in graph.output]
    if OUTPUT_EMBEDDING not in outputs or OUTPUT_PROBABILITIES not in outputs:
        raise ModelError(f"the base model lacks '{OUTPUT_EMBEDDING}' or '{OUTPUT_PROBABILITIES}'")
    _keep_only(graph, OUTPUT_EMBEDDING)
    names = {n for node in graph.node for n in node.output} | {i.name for i in graph.initializer}
    if names & {_WEIGHT, _BIAS, _LOGITS}:
        raise ModelError("the base model already uses the names of the head Winnow appends")
    weight = np.asarray(head.weight, dtype=np.float32)
    bias = np.asarray(head.bias, dtype=np.float32)
    graph.initializer.extend(
        [numpy_helper.from_array(weight, _WEIGHT), numpy_helper.from_array(bias, _BIAS)]
    )
    graph.node.extend(
        [
            helper.make_node(
                "Gemm", [OUTPUT_EMBEDDING, _WEIGHT, _BIAS], [_LOGITS], "winnow_head", transB=1
            ),
            helper.make_node(
                "Softmax", [_LOGITS], [OUTPUT_PROBABILITIES], "winnow_softmax", axis=1
            ),
        ]
    )
    metadata = {p.key: p.value for p in proto.metadata_props}
    metadata.update({SPEC_KEY: head.spec.model_dump_json(), HEAD_KEY: head_metadata(head)})
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def with_head(base: bytes, manifest: ModelManifest, artifact: bytes) -> bytes:
    """The ONNX file a head-only release serves: its base's graph with its head.

    Raises:
        ReleaseError: ``load`` (not a head, or a base it cannot go on) or
            ``spec`` (the head's base or spec is not the manifest's, or its spec
            names another backbone than its base).
    """
    try:
        head = parse_head(artifact)
    except ModelError as exc:
        raise ReleaseError("load", str(exc)) from exc
    if head.base_version != manifest.base_version or head.spec != manifest.spec:
        raise ReleaseError(
            "spec",
            f"the head is for {head.base_version!r} version {head.spec.version!r}; the "
            f"manifest says {manifest.base_version!r} version {manifest.version!r}",
        )
    if head.spec.backbone_version not in (None, head.base_version):
        raise ReleaseError(
            "spec",
            f"the head is on base {head.base_version!r} but its spec names backbone "
            f"{head.spec.backbone_version!r}",
        )
    try:
        return apply_head(base, head)
    except ModelError as exc:
        raise ReleaseError("load", str(exc)) from exc


def _keep_only(graph: onnx.GraphProto, output: str) -> None:
    """Removes every node, initializer and value info that ``output`` does not need.

    ``graph.node`` is in topological order (the ONNX rule), so one backward
    pass finds what the output depends on.
    """
    needed = {output}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    # Old exporters list initializers as graph inputs too: those of the old head must go.
    inputs = [i for i in graph.input if i.name in needed]
    del graph.input[:]
    graph.input.extend(inputs)
