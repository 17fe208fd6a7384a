"""A head-only release served as one ONNX graph: the base's backbone, the new head."""

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import pytest

from schemas.model_spec import ModelSpec
from schemas.models import ModelManifest
from service.errors import ModelError
from service.model.heads import apply_head, parse_head, with_head
from service.model.inference import OnnxModel
from service.model.verification import ReleaseError
from service.scoring.committee import head_from_metadata
from tests.service.model.head_releases import head_release, numpy_probabilities


@pytest.fixture(scope="module")
def base(digits_model_path: Path) -> tuple[bytes, ModelSpec]:
    model = OnnxModel.load(digits_model_path, device="cpu")
    return digits_model_path.read_bytes(), model.spec


def _manifest(artifact: bytes, spec: ModelSpec, base_version: str) -> ModelManifest:
    return ModelManifest(
        model_name="winnow",
        version=spec.version,
        created_at=datetime.now(UTC),
        sha256="0" * 64,
        size_bytes=len(artifact),
        chunk_count=1,
        base_version=base_version,
        spec=spec,
    )


def test_the_served_graph_is_the_base_backbone_with_the_new_head(
    base: tuple[bytes, ModelSpec],
) -> None:
    onnx_bytes, spec = base
    artifact, head_spec, head = head_release(spec, "h1", seed=1, labels_trained=7)
    served = OnnxModel.load(apply_head(onnx_bytes, parse_head(artifact)), device="cpu")
    original = OnnxModel.load(onnx_bytes, device="cpu")
    batch = np.random.default_rng(0).normal(size=(8, 1, 16, 16)).astype(np.float32)
    probabilities, embeddings = served.run(batch)
    assert np.array_equal(embeddings, original.run(batch)[1])  # the backbone, untouched
    assert np.abs(probabilities - numpy_probabilities(embeddings, head)).max() < 1e-5
    assert np.abs(probabilities - original.run(batch)[0]).max() > 0.1  # another head
    assert served.spec == head_spec and served.version == "h1"
    # MC dropout reads the new head from the metadata, as from any trainer export
    weight, bias, rate = head_from_metadata(served.metadata)  # type: ignore[misc]
    assert np.allclose(weight, head.weight) and np.allclose(bias, head.bias) and rate == 0.3
    graph = onnx.load_from_string(apply_head(onnx_bytes, parse_head(artifact))).graph
    assert [n.op_type for n in graph.node].count("Softmax") == 1
    assert len(graph.initializer) == len(onnx.load_from_string(onnx_bytes).graph.initializer)


def test_a_head_is_checked_against_its_manifest_and_its_base(
    base: tuple[bytes, ModelSpec],
) -> None:
    onnx_bytes, spec = base
    artifact, head_spec, _ = head_release(spec, "h1", seed=1)
    with pytest.raises(ReleaseError) as other_base:
        with_head(onnx_bytes, _manifest(artifact, head_spec, "another-base"), artifact)
    assert other_base.value.reason == "spec"
    claimed = head_spec.model_copy(update={"labels_trained": 999})
    with pytest.raises(ReleaseError) as other_spec:
        with_head(onnx_bytes, _manifest(artifact, claimed, spec.version), artifact)
    assert other_spec.value.reason == "spec"
    with pytest.raises(ReleaseError) as garbage:
        with_head(onnx_bytes, _manifest(b"{}", head_spec, spec.version), b"{}")
    assert garbage.value.reason == "load"
    with pytest.raises(ReleaseError) as no_onnx:
        with_head(b"not onnx", _manifest(artifact, head_spec, spec.version), artifact)
    assert no_onnx.value.reason == "load"
    served = with_head(onnx_bytes, _manifest(artifact, head_spec, spec.version), artifact)
    assert OnnxModel.load(served, device="cpu").spec == head_spec


def test_a_head_that_does_not_fit_the_backbone_does_not_load(
    base: tuple[bytes, ModelSpec],
) -> None:
    onnx_bytes, spec = base
    wider = spec.model_copy(update={"embedding_dim": spec.embedding_dim * 2})
    artifact, _, _ = head_release(wider, "h-wide", seed=2)
    with pytest.raises(ModelError):
        OnnxModel.load(apply_head(onnx_bytes, parse_head(artifact)), device="cpu")
    with pytest.raises(ModelError, match="not a head"):
        parse_head(json.dumps({"format": "winnow-head-v1"}).encode())


def test_a_head_names_its_base_as_its_backbone(base: tuple[bytes, ModelSpec]) -> None:
    onnx_bytes, spec = base
    artifact, head_spec, _ = head_release(spec, "h1", seed=1, backbone_version=spec.version)
    served = with_head(onnx_bytes, _manifest(artifact, head_spec, spec.version), artifact)
    assert OnnxModel.load(served, device="cpu").spec.backbone == spec.version
    elsewhere, other_spec, _ = head_release(spec, "h2", seed=1, backbone_version="another")
    with pytest.raises(ReleaseError) as other:
        with_head(onnx_bytes, _manifest(elsewhere, other_spec, spec.version), elsewhere)
    assert other.value.reason == "spec"
    # published before the field: the served spec stays the manifest's, its own backbone
    old, old_spec, _ = head_release(spec, "h3", seed=1)
    served = with_head(onnx_bytes, _manifest(old, old_spec, spec.version), old)
    assert OnnxModel.load(served, device="cpu").spec.backbone == "h3"
