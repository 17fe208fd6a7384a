"""Joins the models topic's manifests and chunks into complete releases.

A release is a manifest plus artifact chunks (no message over 1 MiB); they may
arrive in any order, repeated, or interleaved with other releases.
"""

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import Field, TypeAdapter, ValidationError

from schemas.models import ModelChunk, ModelManifest

log = logging.getLogger(__name__)

_RECORD: TypeAdapter[ModelManifest | ModelChunk] = TypeAdapter(
    Annotated[ModelManifest | ModelChunk, Field(discriminator="kind")]
)


@dataclass
class _Partial:
    manifest: ModelManifest | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)


class ReleaseAssembler:
    """Joins manifests and chunks into complete ``(manifest, artifact)`` pairs.

    Duplicate chunks are harmless; a new manifest for the same version with a
    different digest or chunk count supersedes the partial state; chunks seen
    before their manifest are kept. At most ``max_pending`` partial releases
    are kept; the oldest is dropped beyond that.
    """

    def __init__(self, max_pending: int = 4, max_artifact_bytes: int = 2 * 1024**3) -> None:
        self._pending: OrderedDict[tuple[str, str], _Partial] = OrderedDict()
        self._max_pending = max_pending
        self._max_bytes = max_artifact_bytes

    @property
    def pending(self) -> int:
        """Partial releases held."""
        return len(self._pending)

    def feed(
        self, value: bytes | None, topic: str = "?", partition: int = -1, offset: int = -1
    ) -> tuple[ModelManifest, bytes] | None:
        """Takes one record's value; returns a release when this record completes one.

        Invalid records are logged (with topic, partition and offset) and ignored.
        """
        where = f"topic={topic} partition={partition} offset={offset}"
        try:
            record = _RECORD.validate_json(value or b"")
        except ValidationError as exc:
            log.warning("ignoring an invalid models record %s: %s", where, _first_error(exc))
            return None
        if isinstance(record, ModelManifest):
            return self._on_manifest(record, where)
        return self._on_chunk(record, where)

    def _on_manifest(
        self, manifest: ModelManifest, where: str
    ) -> tuple[ModelManifest, bytes] | None:
        if manifest.size_bytes > self._max_bytes:
            log.warning("ignoring a manifest of %d bytes %s", manifest.size_bytes, where)
            return None
        key = (manifest.model_name, manifest.version)
        partial = self._partial(key)
        old = partial.manifest
        if old is not None and (old.sha256, old.chunk_count) != (
            manifest.sha256,
            manifest.chunk_count,
        ):
            log.info("a new manifest supersedes version %s %s", manifest.version, where)
            partial.chunks.clear()
        partial.manifest = manifest
        partial.chunks = {i: data for i, data in partial.chunks.items() if i < manifest.chunk_count}
        return self._complete(key)

    def _on_chunk(self, chunk: ModelChunk, where: str) -> tuple[ModelManifest, bytes] | None:
        key = (chunk.model_name, chunk.version)
        partial = self._partial(key)
        expected = partial.manifest.chunk_count if partial.manifest else chunk.count
        if chunk.index >= expected or chunk.count != expected:
            log.warning(
                "ignoring chunk %d/%d of version %s %s: the release has %d chunks",
                chunk.index,
                chunk.count,
                chunk.version,
                where,
                expected,
            )
            return None
        partial.chunks[chunk.index] = chunk.data
        return self._complete(key)

    def _partial(self, key: tuple[str, str]) -> _Partial:
        if key in self._pending:
            self._pending.move_to_end(key)
            return self._pending[key]
        partial = self._pending[key] = _Partial()
        while len(self._pending) > self._max_pending:
            (name, version), _ = self._pending.popitem(last=False)
            log.warning("dropping the incomplete release %s %s (too many pending)", name, version)
        return partial

    def _complete(self, key: tuple[str, str]) -> tuple[ModelManifest, bytes] | None:
        partial = self._pending[key]
        manifest = partial.manifest
        if manifest is None or len(partial.chunks) < manifest.chunk_count:
            return None
        del self._pending[key]
        artifact = b"".join(partial.chunks[i] for i in range(manifest.chunk_count))
        return manifest, artifact


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    return f"{errors[0]['msg']} at {errors[0]['loc']}" if errors else str(exc)
