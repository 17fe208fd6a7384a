"""Joins the models topic's manifests and chunks into complete releases.

A release is a manifest plus artifact chunks (no message over 1 MiB). Chunks
carry their index and the count, so they may arrive in any order, repeated, or
interleaved with other releases: a release is put together by index once every
chunk is there, and its sha256 (and signature) are checked after that.

What cannot be put together is refused, with a reason (:class:`Refusal`):

* ``chunks``: one index arrived twice with different bytes. Which copy is right
  cannot be known (the digest covers the whole artifact), and the trainer never
  sends two: someone else wrote to the topic.
* ``incomplete``: chunks are missing, known when a newer release of the same
  model name begins (the trainer publishes one release's records, all
  acknowledged, before the next one's, on one partition) or when nothing of the
  release arrived for ``stall_s`` seconds after its manifest.
"""

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter, ValidationError

from schemas.models import ModelChunk, ModelManifest

log = logging.getLogger(__name__)

_RECORD: TypeAdapter[ModelManifest | ModelChunk] = TypeAdapter(
    Annotated[ModelManifest | ModelChunk, Field(discriminator="kind")]
)


@dataclass
class _Partial:
    touched: float
    manifest: ModelManifest | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)
    conflict: int | None = None  # an index that arrived twice with different bytes


@dataclass(frozen=True)
class Refusal:
    """A release that cannot be put together: its manifest, and why."""

    manifest: ModelManifest
    reason: Literal["chunks", "incomplete"]
    detail: str


class ReleaseAssembler:
    """Joins manifests and chunks into complete ``(manifest, artifact)`` pairs.

    Identical duplicate chunks are harmless; a new manifest for the same version
    with a different digest or chunk count supersedes the partial state; chunks
    seen before their manifest are kept. At most ``max_pending`` partial
    releases are kept; the oldest is dropped beyond that. Releases that cannot
    be completed are collected for :meth:`take_refusals` (see the module docstring).

    Args:
        max_pending: partial releases held at most.
        max_artifact_bytes: a manifest announcing more is ignored.
        stall_s: a release with a manifest and nothing new for this long is incomplete.
        clock: monotonic seconds; injectable for tests.
    """

    def __init__(
        self,
        max_pending: int = 4,
        max_artifact_bytes: int = 2 * 1024**3,
        *,
        stall_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pending: OrderedDict[tuple[str, str], _Partial] = OrderedDict()
        self._max_pending = max_pending
        self._max_bytes = max_artifact_bytes
        self._stall_s = stall_s
        self._clock = clock
        self._refusals: list[Refusal] = []

    @property
    def pending(self) -> int:
        """Partial releases held."""
        return len(self._pending)

    def take_refusals(self) -> list[Refusal]:
        """The releases refused since the last call (each once), oldest first."""
        refusals, self._refusals = self._refusals, []
        return refusals

    def expire(self) -> None:
        """Refuses releases stalled for ``stall_s`` (missing chunks); drops stale stray chunks."""
        now = self._clock()
        for key, partial in list(self._pending.items()):
            if now - partial.touched < self._stall_s:
                continue
            del self._pending[key]
            if partial.manifest is None:
                log.info("dropping stray chunks of %s %s: no manifest came", *key)
                continue
            self._refuse(partial, f"no record of it for {now - partial.touched:.0f} s")

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
        for other_key, other in list(self._pending.items()):
            if other_key[0] == key[0] and other_key != key and other.manifest is not None:
                del self._pending[other_key]  # the publisher has moved on: nothing more comes
                self._refuse(other, f"release {manifest.version} began {where} before them")
        partial = self._partial(key)
        old = partial.manifest
        if old is not None and (old.sha256, old.chunk_count) != (
            manifest.sha256,
            manifest.chunk_count,
        ):
            log.info("a new manifest supersedes version %s %s", manifest.version, where)
            partial.chunks.clear()
            partial.conflict = None
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
        held = partial.chunks.get(chunk.index)
        if held is not None and held != chunk.data and partial.conflict is None:
            log.warning(
                "chunk %d of version %s arrived again with different bytes %s",
                chunk.index,
                chunk.version,
                where,
            )
            partial.conflict = chunk.index
        partial.chunks.setdefault(chunk.index, chunk.data)
        return self._complete(key)

    def _partial(self, key: tuple[str, str]) -> _Partial:
        if key in self._pending:
            self._pending.move_to_end(key)
            partial = self._pending[key]
            partial.touched = self._clock()
            return partial
        partial = self._pending[key] = _Partial(touched=self._clock())
        while len(self._pending) > self._max_pending:
            (name, version), _ = self._pending.popitem(last=False)
            log.warning("dropping the incomplete release %s %s (too many pending)", name, version)
        return partial

    def _complete(self, key: tuple[str, str]) -> tuple[ModelManifest, bytes] | None:
        partial = self._pending[key]
        manifest = partial.manifest
        if manifest is not None and partial.conflict is not None:
            del self._pending[key]
            self._refuse(partial, "")
            return None
        if manifest is None or len(partial.chunks) < manifest.chunk_count:
            return None
        del self._pending[key]
        artifact = b"".join(partial.chunks[i] for i in range(manifest.chunk_count))
        return manifest, artifact

    def _refuse(self, partial: _Partial, why: str) -> None:
        manifest = partial.manifest
        assert manifest is not None
        if partial.conflict is not None:
            detail = (
                f"chunk {partial.conflict} of {manifest.chunk_count} arrived twice with "
                "different bytes: which one is the release's cannot be told"
            )
            self._refusals.append(Refusal(manifest, "chunks", detail))
            return
        missing = [i for i in range(manifest.chunk_count) if i not in partial.chunks]
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        detail = f"chunks {shown} of {manifest.chunk_count} never arrived ({why})"
        self._refusals.append(Refusal(manifest, "incomplete", detail))


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    return f"{errors[0]['msg']} at {errors[0]['loc']}" if errors else str(exc)
