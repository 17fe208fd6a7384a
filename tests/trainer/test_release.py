"""Publishing a release: manifest, chunks under 1 MiB, order, signatures, on a real broker."""

import json
import math
import os

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from infra.kafka.connection import client_kwargs
from schemas.model_spec import ModelSpec
from schemas.models import ModelChunk, ModelManifest
from schemas.release_codec import CHUNK_BYTES, MAX_RECORD_BYTES, sha256_hex, verify_signature
from trainer.release import build_release, encode_records, publish_release

ARTIFACT = os.urandom(3 * 1024 * 1024 + 12345)


def _spec(version: str = "7", parent: str | None = "6") -> ModelSpec:
    return ModelSpec(
        name="digits",
        version=version,
        parent_version=parent,
        arch="resnet18",
        classes=["a", "b"],
        input_size=(32, 32),
        channels=3,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        embedding_dim=512,
        labels_trained=40,
        metrics={"accuracy": 0.9},
    )


def test_manifest_describes_the_artifact_and_is_unsigned_without_a_key() -> None:
    manifest, chunks = build_release(ARTIFACT, _spec(), None)
    assert manifest.model_name == "digits"
    assert (manifest.version, manifest.parent_version) == ("7", "6")
    assert manifest.sha256 == sha256_hex(ARTIFACT)
    assert manifest.size_bytes == len(ARTIFACT)
    assert manifest.chunk_count == len(chunks) == math.ceil(len(ARTIFACT) / CHUNK_BYTES) == 5
    assert manifest.signature is None
    assert manifest.spec == _spec()
    assert [c.index for c in chunks] == list(range(5))
    assert all(c.count == 5 and c.version == "7" for c in chunks)
    assert b"".join(c.data for c in chunks) == ARTIFACT


def test_signature_present_with_a_key_and_bound_to_name_and_version() -> None:
    manifest, _ = build_release(ARTIFACT, _spec(), b"k", model_name="other")
    assert manifest.model_name == "other"
    assert manifest.signature is not None
    assert verify_signature(ARTIFACT, manifest.signature, b"k", model_name="other", version="7")
    assert not verify_signature(
        ARTIFACT, manifest.signature, b"k", model_name="digits", version="7"
    )


def test_every_record_is_under_one_mib_including_json() -> None:
    manifest, chunks = build_release(ARTIFACT, _spec(), b"k")
    values = encode_records(manifest, chunks)
    assert len(values) == 6
    assert max(len(v) for v in values) <= MAX_RECORD_BYTES
    assert max(len(v) for v in values[1:]) > 0.95 * MAX_RECORD_BYTES  # chunks are not tiny


async def test_publish_puts_manifest_then_chunks_in_order_on_one_partition(
    kafka_settings, winnow_topics
) -> None:
    producer = AIOKafkaProducer(**client_kwargs(kafka_settings), acks="all")
    await producer.start()
    try:
        manifest = await publish_release(
            producer, winnow_topics.models, ARTIFACT, _spec(), signing_key=b"k"
        )
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        winnow_topics.models,
        group_id=None,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=16 * 1024 * 1024,
        **client_kwargs(kafka_settings),
    )
    await consumer.start()
    records = []
    try:
        while len(records) < 6:
            for batch in (await consumer.getmany(timeout_ms=1000)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    assert len(records) == 6
    assert {r.partition for r in records} == {records[0].partition}
    assert {r.key for r in records} == {b"digits"}
    assert max(len(r.value) for r in records) <= MAX_RECORD_BYTES
    assert json.loads(records[0].value)["kind"] == "manifest"
    assert ModelManifest.model_validate_json(records[0].value) == manifest
    chunks = [ModelChunk.model_validate_json(r.value) for r in records[1:]]
    assert [c.index for c in chunks] == list(range(5))
    assert b"".join(c.data for c in chunks) == ARTIFACT
