"""Head-only releases for the scorer's tests: a random head on a published full release.

The artifact is built by the trainer's own encoding (``trainer.refit.head_artifact``)."""

from pathlib import Path

import numpy as np
import onnx
from aiokafka import AIOKafkaProducer

from infra.kafka.connection import client_kwargs
from schemas.model_spec import SPEC_KEY, ModelSpec
from trainer.head import LinearHead
from trainer.refit import head_artifact
from trainer.release import publish_release


def full_release(path: Path, version: str, **spec_fields: object) -> tuple[bytes, ModelSpec]:
    """A loadable copy of the ONNX file at ``path`` whose spec has ``version`` and the fields."""
    model = onnx.load(str(path))
    (prop,) = [p for p in model.metadata_props if p.key == SPEC_KEY]
    spec = ModelSpec.model_validate_json(prop.value).model_copy(
        update={"version": version, **spec_fields}
    )
    prop.value = spec.model_dump_json()
    return model.SerializeToString(), spec


def random_head(spec: ModelSpec, seed: int) -> LinearHead:
    """A head for ``spec``'s classes and embedding, different for each seed."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(scale=0.5, size=(len(spec.classes), spec.embedding_dim))
    bias = rng.normal(scale=0.5, size=len(spec.classes))
    return LinearHead(weight.astype(np.float32), bias.astype(np.float32))


def head_release(
    base: ModelSpec, version: str, seed: int, **spec_fields: object
) -> tuple[bytes, ModelSpec, LinearHead]:
    """The artifact, spec and head of a head-only release ``version`` on ``base``."""
    spec = base.model_copy(
        update={"version": version, "parent_version": base.version, **spec_fields}
    )
    head = random_head(base, seed)
    return head_artifact(spec, base.version, head, 0.3), spec, head


def numpy_probabilities(embeddings: np.ndarray, head: LinearHead) -> np.ndarray:
    """``softmax(embedding @ weight.T + bias)``, computed in float64."""
    logits = embeddings.astype(np.float64) @ head.weight.T.astype(np.float64) + head.bias
    out = np.exp(logits - logits.max(axis=1, keepdims=True))
    return out / out.sum(axis=1, keepdims=True)


async def publish_head(
    settings, artifact: bytes, spec: ModelSpec, base_version: str, key: bytes | None = None
) -> None:
    """Publishes a head-only release as the trainer does."""
    producer = AIOKafkaProducer(**client_kwargs(settings.kafka), acks="all")
    await producer.start()
    try:
        await publish_release(
            producer,
            settings.kafka.topics.models,
            artifact,
            spec,
            key,
            base_version=base_version,
        )
    finally:
        await producer.stop()
