"""Model releases on the scorer's side: assemble, verify, load, warm up, hand over.

:class:`ModelReleases` reads the whole models topic from the beginning with a
group-less consumer, so a scorer that starts late still finds the latest
release. On startup it reads up to the end offsets it found, assembles every
release, and loads only the newest one that verifies (falling back to the next
newest when that fails to load). After that, each new release is verified
(size, sha256, and the HMAC signature when a signing key is configured),
loaded and warmed in a thread, and only then handed to ``on_model``, which
swaps it in. A release that fails anywhere leaves the serving model alone.
The last few verified artifacts are kept so that an earlier version can be
pinned back.
"""

import asyncio
import inspect
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import Field, TypeAdapter, ValidationError

from infra.kafka.admin import ensure_topics
from infra.kafka.consumer import create_consumer
from schemas.api import ReleaseEntry
from schemas.models import ModelChunk, ModelManifest
from schemas.release_codec import sha256_hex, verify_signature
from service.config import Settings
from service.errors import WinnowError
from service.metrics import ScorerMetrics
from service.model.inference import OnnxModel

log = logging.getLogger(__name__)

ReleaseReason = Literal[
    "checksum", "signature", "unsigned", "incomplete", "load", "spec", "unknown", "evicted"
]
ReleaseStatus = Literal["active", "available", "rejected"]  # as in schemas.api.ReleaseEntry
OnModel = Callable[[OnnxModel, ModelManifest], Any]

_RECORD: TypeAdapter[ModelManifest | ModelChunk] = TypeAdapter(
    Annotated[ModelManifest | ModelChunk, Field(discriminator="kind")]
)
_POLL_MS = 500
_DRAIN_MS = 200
_RETRY_BACKOFF_S = 2.0


class ReleaseError(WinnowError):
    """A release that cannot be served, and why (``reason``, machine-readable).

    Reasons: ``checksum`` (size or sha256 differ), ``signature`` (does not
    verify), ``unsigned`` (a key is configured but the release has no
    signature), ``incomplete`` (chunks missing), ``load`` (onnxruntime cannot
    load or run it), ``spec`` (the file's spec disagrees with the manifest),
    ``unknown`` (no such verified version), ``evicted`` (its artifact is no
    longer kept).
    """

    def __init__(self, reason: ReleaseReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: ReleaseReason = reason
        self.detail = detail


class ReleaseInfo(ReleaseEntry):
    """One release as the scorer saw it (the wire shape of ``GET /v1/model``'s history)."""

    @classmethod
    def of(
        cls, manifest: ModelManifest, status: ReleaseStatus, reason: str | None = None
    ) -> "ReleaseInfo":
        return cls(
            model_name=manifest.model_name,
            version=manifest.version,
            parent_version=manifest.parent_version,
            created_at=manifest.created_at,
            sha256=manifest.sha256,
            labels_trained=manifest.spec.labels_trained,
            metrics=manifest.spec.metrics,
            status=status,
            reason=reason,
        )


def signing_key(settings: Settings) -> bytes | None:
    """The configured HMAC key's bytes (UTF-8 of ``WINNOW_MODEL_SIGNING_KEY``), or None."""
    secret = settings.model_signing_key
    value = secret.get_secret_value() if secret is not None else ""
    return value.encode("utf-8") if value else None


def verify_release(manifest: ModelManifest, artifact: bytes, signing_key: bytes | None) -> None:
    """Checks an assembled artifact against its manifest.

    Args:
        manifest: the release's manifest.
        artifact: the joined chunks.
        signing_key: the HMAC key's bytes; None skips the signature check.

    Raises:
        ReleaseError: ``checksum`` (size or sha256), ``unsigned`` or ``signature``.
    """
    if len(artifact) != manifest.size_bytes:
        raise ReleaseError(
            "checksum", f"artifact is {len(artifact)} bytes, manifest says {manifest.size_bytes}"
        )
    digest = sha256_hex(artifact)
    if digest != manifest.sha256:
        raise ReleaseError("checksum", f"sha256 is {digest}, manifest says {manifest.sha256}")
    if signing_key is None:
        return
    if not manifest.signature:
        raise ReleaseError("unsigned", "a signing key is configured but the release is unsigned")
    if not verify_signature(
        artifact,
        manifest.signature,
        signing_key,
        model_name=manifest.model_name,
        version=manifest.version,
    ):
        raise ReleaseError("signature", "the signature does not verify with the configured key")


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


@dataclass
class _Release:
    manifest: ModelManifest
    info: ReleaseInfo


class ModelReleases:
    """Watches the models topic and hands verified, warmed models to ``on_model``.

    Use as ``async with ModelReleases(settings, on_model=...) as releases:``.
    ``on_model(model, manifest)`` runs on the event loop after the model is
    loaded and warmed; it may be a coroutine function. It may also be set
    after construction (``releases.on_model = ...``); :attr:`model` is the
    model last handed over either way.
    """

    swap_results: ClassVar[dict[str, str]] = {"load": "load_failed"}

    def __init__(
        self,
        settings: Settings,
        on_model: OnModel | None = None,
        *,
        metrics: ScorerMetrics | None = None,
        keep_artifacts: int = 5,
        model_name: str | None = None,
        current_version: str | None = None,
        max_history: int = 100,
    ) -> None:
        """Prepares the watcher; nothing connects before ``start()``.

        Args:
            settings: Kafka, device and ``model_signing_key``.
            on_model: called with each model to serve and its manifest.
            metrics: where ``winnow_model_swaps_total{result}`` is counted.
            keep_artifacts: verified artifacts kept for :meth:`pin` (K).
            model_name: only releases of this name (the record key); None: any.
            current_version: the version already serving, not reloaded at startup.
            max_history: release entries kept in :meth:`history`.
        """
        self.on_model = on_model
        self.metrics = metrics or ScorerMetrics()
        self.model: OnnxModel | None = None
        self._settings = settings
        self._key = signing_key(settings)
        self._topic = settings.kafka.topics.models
        self._keep = max(1, keep_artifacts)
        self._model_name = model_name
        self._active = current_version
        self._max_history = max_history
        self._pinned: str | None = None
        self._assembler = ReleaseAssembler()
        self._releases: OrderedDict[str, _Release] = OrderedDict()
        self._artifacts: OrderedDict[str, bytes] = OrderedDict()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._swap_lock = asyncio.Lock()
        self._first = asyncio.Event()
        self._caught_up = asyncio.Event()
        self._stopped = False

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> "ModelReleases":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connects, assigns every partition of the models topic from the beginning."""
        if self._task is not None:
            return
        await ensure_topics(self._settings.kafka, [self._topic])
        consumer = create_consumer(self._settings.kafka, group_id=None)
        await consumer.start()
        self._consumer = consumer
        try:
            partitions = await self._partitions(consumer)
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends = await consumer.end_offsets(partitions)
        except BaseException:
            await consumer.stop()
            raise
        self._task = asyncio.create_task(self._run(ends), name="model-releases")
        self._task.add_done_callback(_log_crash)
        log.info("watching model releases: topic=%s end_offsets=%s", self._topic, _fmt(ends))

    async def stop(self) -> None:
        """Stops watching and disconnects. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()

    async def wait_for_first(self, timeout: float | None = None) -> OnnxModel:  # noqa: ASYNC109
        """Waits until a model has been handed over, and returns it.

        Raises:
            TimeoutError: no release could be served within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            await self._first.wait()
        assert self.model is not None
        return self.model

    async def wait_caught_up(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Waits until the releases present at ``start()`` are read and handled."""
        async with asyncio.timeout(timeout):
            await self._caught_up.wait()

    # -- queries ---------------------------------------------------------------------------

    @property
    def active_version(self) -> str | None:
        return self._active

    @property
    def pinned(self) -> str | None:
        """The version pinned with :meth:`pin`, or None when following new releases."""
        return self._pinned

    def history(self) -> list[ReleaseInfo]:
        """Every release seen (oldest first), with its status."""
        out = []
        for version, release in self._releases.items():
            status = "active" if version == self._active else release.info.status
            out.append(
                release.info.model_copy(
                    update={"status": status, "pinnable": version in self._artifacts}
                )
            )
        return out

    # -- pinning ---------------------------------------------------------------------------

    async def pin(self, version: str) -> OnnxModel:
        """Serves a kept earlier (or any verified) version and stops following new releases.

        Raises:
            ReleaseError: ``unknown`` (never seen or rejected), ``evicted`` (its
                artifact is no longer kept) or ``load``.
        """
        release = self._releases.get(version)
        if release is None or release.info.status == "rejected":
            why = "never seen" if release is None else f"rejected ({release.info.reason})"
            raise ReleaseError("unknown", f"version {version!r} is not a verified release: {why}")
        artifact = self._artifacts.get(version)
        if artifact is None:
            raise ReleaseError(
                "evicted",
                f"version {version!r} is no longer kept (only the last {self._keep} are)",
            )
        async with self._swap_lock:
            try:
                model = await self._load(release.manifest, artifact)
            except ReleaseError as exc:
                self._artifacts.pop(version, None)
                self._reject(release.manifest, exc)
                raise
            await self._hand_over(model, release.manifest, result="pinned")
            self._pinned = version
        return model

    async def unpin(self) -> OnnxModel | None:
        """Follows new releases again, swapping to the newest verified one now.

        Returns:
            The model swapped in, or None when the pinned one is already the newest.
        """
        self._pinned = None
        async with self._swap_lock:
            releases = self._releases.values()
            candidates = [r.manifest for r in releases if r.info.status != "rejected"]
            if not candidates or candidates[-1].version == self._active:
                return None
            return await self._serve_newest(candidates)

    # -- the watch loop --------------------------------------------------------------------

    async def _run(self, ends: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        backlog = await self._catch_up(self._consumer, ends)
        async with self._swap_lock:
            fresh = backlog and backlog[-1].version != self._active
            if fresh and self._pinned is None:
                await self._serve_newest(backlog)
        self._caught_up.set()
        log.info("model releases caught up: topic=%s active=%s", self._topic, self._active)
        while True:
            batches = await self._fetch(self._consumer, _POLL_MS)
            for manifest, artifact in self._assemble(batches):
                async with self._swap_lock:
                    try:
                        await self._on_release(manifest, artifact)
                    except Exception:  # e.g. on_model failed: keep watching, old model serves
                        log.exception("handling release %s failed", manifest.version)

    async def _catch_up(
        self, consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]
    ) -> list[ModelManifest]:
        """Reads up to ``ends``; returns the verified releases found, oldest first."""
        verified: list[ModelManifest] = []
        while True:
            # Some brokers (Tansu) report the last batch's base offset + 1 as the end:
            # past the reported end, read on until a poll comes back empty.
            reached = await self._reached(consumer, ends)
            batches = await self._fetch(consumer, _DRAIN_MS if reached else _POLL_MS)
            for manifest, artifact in self._assemble(batches):
                if self._accept(manifest, artifact):
                    verified.append(manifest)
            if reached and not batches:
                return verified

    async def _reached(self, consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
        for tp, end in ends.items():
            if await consumer.position(tp) < end:
                return False
        return True

    async def _fetch(self, consumer: AIOKafkaConsumer, timeout_ms: int) -> dict[Any, list[Any]]:
        try:
            return await consumer.getmany(timeout_ms=timeout_ms)
        except KafkaError as exc:
            log.warning("reading %s failed, retrying: %r", self._topic, exc)
            await asyncio.sleep(_RETRY_BACKOFF_S)
            return {}

    def _assemble(self, batches: dict[Any, list[Any]]) -> list[tuple[ModelManifest, bytes]]:
        complete = []
        for tp, records in batches.items():
            for r in records:
                if self._model_name is not None and r.key != self._model_name.encode():
                    continue
                release = self._assembler.feed(r.value, tp.topic, tp.partition, r.offset)
                if release is not None:
                    log.info(
                        "release assembled: topic=%s partition=%d offset=%d version=%s",
                        tp.topic,
                        tp.partition,
                        r.offset,
                        release[0].version,
                    )
                    complete.append(release)
        return complete

    async def _on_release(self, manifest: ModelManifest, artifact: bytes) -> None:
        """Handles a release that arrived after catch-up."""
        known = self._releases.get(manifest.version)
        if (
            known is not None
            and known.info.status != "rejected"
            and known.manifest.sha256 == manifest.sha256
        ):
            log.info("release %s seen before; ignoring the repeat", manifest.version)
            return
        if not self._accept(manifest, artifact):
            return
        if self._pinned is not None:
            log.info("release %s kept but not served: pinned to %s", manifest.version, self._pinned)
            return
        await self._serve_newest([manifest])

    def _accept(self, manifest: ModelManifest, artifact: bytes) -> bool:
        """Verifies a release, records it, keeps its artifact; False when rejected."""
        try:
            verify_release(manifest, artifact, self._key)
        except ReleaseError as exc:
            self._reject(manifest, exc)
            return False
        self._record(manifest, "available", None)
        self._artifacts[manifest.version] = artifact
        self._artifacts.move_to_end(manifest.version)
        while len(self._artifacts) > self._keep:
            keep = (manifest.version, self._active)
            oldest = next((v for v in self._artifacts if v not in keep), None)
            del self._artifacts[oldest if oldest is not None else next(iter(self._artifacts))]
        return True

    async def _serve_newest(self, candidates: list[ModelManifest]) -> OnnxModel | None:
        """Loads the newest candidate that loads (newest first) and hands it over."""
        for manifest in reversed(candidates):
            artifact = self._artifacts.get(manifest.version)
            if artifact is None:
                continue
            try:
                model = await self._load(manifest, artifact)
            except ReleaseError as exc:
                self._artifacts.pop(manifest.version, None)
                self._reject(manifest, exc)
                continue
            await self._hand_over(model, manifest, result="ok")
            return model
        return None

    async def _load(self, manifest: ModelManifest, artifact: bytes) -> OnnxModel:
        """Loads and warms a model in a thread; checks its spec against the manifest.

        Raises:
            ReleaseError: ``load`` or ``spec``.
        """
        try:
            model = await asyncio.to_thread(_load_and_warm, artifact, self._settings.device)
        except Exception as exc:  # onnxruntime raises its own kinds; ModelError too
            raise ReleaseError("load", str(exc)) from exc
        if model.spec != manifest.spec:
            raise ReleaseError(
                "spec",
                f"the file's spec (version {model.version}) differs from the manifest's "
                f"(version {manifest.version})",
            )
        return model

    async def _hand_over(self, model: OnnxModel, manifest: ModelManifest, result: str) -> None:
        if self.on_model is not None:
            outcome = self.on_model(model, manifest)
            if inspect.isawaitable(outcome):
                await outcome
        previous, self._active, self.model = self._active, manifest.version, model
        self.metrics.model_swaps.labels(result=result).inc()
        self.metrics.set_model(manifest.version)
        self._first.set()
        log.info(
            "model swapped: topic=%s version=%s previous=%s provider=%s",
            self._topic,
            manifest.version,
            previous,
            model.provider,
        )

    def _reject(self, manifest: ModelManifest, error: ReleaseError) -> None:
        result = self.swap_results.get(error.reason, f"rejected_{error.reason}")
        self.metrics.model_swaps.labels(result=result).inc()
        self._record(manifest, "rejected", error.reason)
        log.warning(
            "release rejected: topic=%s model=%s version=%s result=%s: %s",
            self._topic,
            manifest.model_name,
            manifest.version,
            result,
            error.detail,
        )

    def _record(self, manifest: ModelManifest, status: ReleaseStatus, reason: str | None) -> None:
        self._releases.pop(manifest.version, None)
        self._releases[manifest.version] = _Release(
            manifest, ReleaseInfo.of(manifest, status, reason)
        )
        while len(self._releases) > self._max_history:
            self._releases.popitem(last=False)

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        partitions = consumer.partitions_for_topic(self._topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(self._topic) or set()
        return [TopicPartition(self._topic, p) for p in sorted(partitions)]


def _load_and_warm(artifact: bytes, device: Any) -> OnnxModel:
    model = OnnxModel.load(artifact, device=device)
    model.warm_up()
    return model


def _log_crash(task: "asyncio.Task[None]") -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the model release watcher died", exc_info=task.exception())


def _fmt(ends: dict[TopicPartition, int]) -> str:
    return ",".join(f"{tp.partition}:{offset}" for tp, offset in sorted(ends.items()))
