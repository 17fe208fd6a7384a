"""Publishes a model release on ``winnow.models``: one manifest, then the artifact in chunks.

A full release's artifact is the ONNX file; a head-only release's is the new
head as JSON (:class:`~schemas.models.HeadArtifact`), and its manifest names
the full release whose backbone it belongs to (``base_version``).

Every record is keyed by the model name, so a release lands on one partition
and its chunks follow its manifest in order. The manifest carries the
artifact's sha256 and, with a signing key, its signature (the format is in
:mod:`schemas.release_codec`). Records are sent through
:class:`~infra.kafka.delivery.Delivery`: a transient broker error sends the
whole release again (the scorer's assembler tolerates the duplicates).
"""

import base64
import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer

from infra.kafka.delivery import DEFAULT_BACKOFF_S, Delivery, OutRecord
from schemas.model_spec import ModelSpec
from schemas.models import ModelChunk, ModelManifest
from schemas.release_codec import MAX_RECORD_BYTES, sha256_hex, sign, split_chunks
from trainer.errors import TrainerError

log = logging.getLogger(__name__)


class ReleasePublishError(TrainerError):
    """A release that cannot be built or that the broker did not acknowledge."""


def build_release(
    artifact: bytes,
    spec: ModelSpec,
    signing_key: bytes | None,
    model_name: str | None = None,
    *,
    base_version: str | None = None,
) -> tuple[ModelManifest, list[ModelChunk]]:
    """Builds the manifest and chunks of one release.

    Args:
        artifact: the ONNX file's bytes, whose metadata must carry ``spec``; or,
            for a head-only release, the :class:`~schemas.models.HeadArtifact`
            JSON, which carries ``spec`` and ``base_version``.
        spec: the model's spec; its version is the release's version.
        signing_key: the HMAC key's bytes, or None to publish unsigned.
        model_name: the record key and the manifest's name; ``spec.name`` if None.
        base_version: set for a head-only release: the full release it builds on.

    Returns:
        ``(manifest, chunks)``; the chunks in index order.

    Raises:
        ReleasePublishError: an empty artifact or an unsignable name or version.
    """
    name = model_name or spec.name
    try:
        pieces = split_chunks(artifact)
        signature = (
            sign(artifact, signing_key, model_name=name, version=spec.version)
            if signing_key is not None
            else None
        )
    except ValueError as exc:
        raise ReleasePublishError(f"cannot build release {name} {spec.version}: {exc}") from exc
    manifest = ModelManifest(
        model_name=name,
        version=spec.version,
        parent_version=spec.parent_version,
        created_at=datetime.now(UTC),
        sha256=sha256_hex(artifact),
        size_bytes=len(artifact),
        chunk_count=len(pieces),
        signature=signature,
        base_version=base_version,
        spec=spec,
    )
    # ``data`` is Base64Bytes: it validates (decodes) base64, so it is given encoded.
    chunks = [
        ModelChunk(
            model_name=name,
            version=spec.version,
            index=i,
            count=len(pieces),
            data=base64.b64encode(piece),
        )
        for i, piece in enumerate(pieces)
    ]
    return manifest, chunks


def encode_records(manifest: ModelManifest, chunks: list[ModelChunk]) -> list[bytes]:
    """The record values, manifest first; each checked against the 1 MiB limit.

    Raises:
        ReleasePublishError: a record would exceed ``MAX_RECORD_BYTES``.
    """
    values = [manifest.model_dump_json().encode()]
    values += [chunk.model_dump_json().encode() for chunk in chunks]
    for value in values:
        if len(value) > MAX_RECORD_BYTES:
            raise ReleasePublishError(
                f"a record of release {manifest.version} would be {len(value)} bytes, "
                f"over the {MAX_RECORD_BYTES}-byte limit"
            )
    return values


async def publish_release(
    producer: AIOKafkaProducer,
    topic: str,
    artifact: bytes,
    spec: ModelSpec,
    signing_key: bytes | None,
    model_name: str | None = None,
    *,
    base_version: str | None = None,
    backoff_s: Sequence[float] = DEFAULT_BACKOFF_S,
) -> ModelManifest:
    """Publishes a release and waits until the broker has acknowledged every record.

    Args:
        producer: a started producer (``acks="all"`` recommended).
        topic: the models topic, e.g. ``winnow.models``.
        artifact: the ONNX file's bytes, or a head-only release's head JSON.
        spec: the model's spec.
        signing_key: the HMAC key's bytes, or None to publish unsigned.
        model_name: the record key; ``spec.name`` if None.
        base_version: set for a head-only release: the full release it builds on.
        backoff_s: waits between attempts after a transient broker error.

    Returns:
        The published manifest.

    Raises:
        ReleasePublishError: the release cannot be built.
        aiokafka.errors.KafkaError: the broker refused a record, or a transient
            error outlasted every retry.
    """
    manifest, chunks = build_release(
        artifact, spec, signing_key, model_name, base_version=base_version
    )
    key = manifest.model_name.encode()
    # Records are queued in order on one key, so the chunks follow their manifest.
    records = [OutRecord(topic, key, value) for value in encode_records(manifest, chunks)]
    delivery = Delivery(producer, backoff_s=backoff_s, what="release records")
    metadata = await delivery.send_all(records)
    log.info(
        "release published: topic=%s partition=%d offsets=%d-%d model=%s version=%s "
        "bytes=%d chunks=%d signed=%s base=%s",
        topic,
        metadata[0].partition,
        metadata[0].offset,
        metadata[-1].offset,
        manifest.model_name,
        manifest.version,
        manifest.size_bytes,
        manifest.chunk_count,
        manifest.signature is not None,
        manifest.base_version,
    )
    return manifest
