"""Model releases on the scorer's side: watch, load, warm up, hand over, pin.

:class:`ModelReleases` reads the whole models topic from the beginning with a
group-less consumer, so a scorer that starts late still finds the latest
release. On startup it reads up to the end offsets it found, assembles every
release (:mod:`service.model.assembler`), and loads only the newest one that
verifies (:mod:`service.model.verification`), falling back to the next newest
when that fails to load. After that, each new release is verified, loaded and
warmed in a thread, and only then handed to ``on_model``, which swaps it in. A
release that fails anywhere leaves the serving model alone. The last few
verified artifacts are kept (:mod:`service.model.catalog`) so that an earlier
version can be pinned back.

A head-only release names its base, a full release whose artifact the scorer
keeps; it is served as that release's ONNX graph with the new head
(:mod:`service.model.heads`), loaded and handed over like any release. One
whose base is unknown, refused or no longer kept is rejected (``base``).

Replays. Whoever can write to the models topic can publish an old release
again, with its valid signature (the signature binds name, version and digest,
not a time). The topic's order is the publication order, so a release is newer
than every release before it, except a version that a later release has
already superseded: one that a verified release published after it followed,
or named as its parent (``parent_version``, also in the model's own spec). Such
a release published again is refused as ``replay``, at startup (catch-up) as
after: the serving model stays, the original stays in the catalog (pinnable),
and ``winnow_model_swaps_total{result="rejected_replay"}`` counts it. A repeat
of the newest release (the trainer resends a release after a broker error) is
ignored quietly. Going back to an older version is the operator's choice,
through :meth:`ModelReleases.pin` (``POST /v1/model/pin``), never the topic's.

Chunks. A release whose chunks conflict or go missing is refused (``chunks``,
``incomplete``; see :mod:`service.model.assembler`) and the serving model stays;
chunks in another order are put together by their index.
"""

import asyncio
import inspect
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar, get_args

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from infra.component import Component
from infra.kafka.admin import ensure_topics, topic_partitions
from infra.kafka.closing import stop_client
from infra.kafka.consumer import create_consumer
from schemas.models import ModelManifest
from service.config import Settings
from service.metrics import ScorerMetrics
from service.model.assembler import Refusal, ReleaseAssembler
from service.model.catalog import ReleaseCatalog, ReleaseInfo
from service.model.heads import with_head
from service.model.inference import OnnxModel
from service.model.verification import (
    ReleaseError,
    ReleaseReason,
    signing_key,
    verify_release,
)

log = logging.getLogger(__name__)

OnModel = Callable[[OnnxModel, ModelManifest], Any]
"""Called on the event loop with each model to serve (loaded and warmed); may be async."""

_POLL_MS = 500
_DRAIN_MS = 200
_RETRY_BACKOFF_S = 2.0
_MAX_SUPERSEDED = 100_000
"""Superseded versions remembered (a few MB at most), oldest forgotten first."""


class ModelReleases(Component):
    """Watches the models topic and hands verified, warmed models to ``on_model``.

    Use as ``async with ModelReleases(settings, on_model=...) as releases:``;
    :attr:`model` is the model last handed over.
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
            keep_artifacts: verified artifacts kept for :meth:`pin`.
            model_name: only releases of this name (the record key); None: any.
            current_version: the version already serving, not reloaded at startup.
            max_history: release entries kept in :meth:`history`.
        """
        super().__init__()
        self.metrics = metrics or ScorerMetrics()
        for result in ("ok", "pinned", *map(self._result, get_args(ReleaseReason))):
            self.metrics.model_swaps.labels(result=result)  # from 0: increase() sees the first
        self.model: OnnxModel | None = None
        self.catalog = ReleaseCatalog(keep_artifacts, max_history, current_version)
        self._on_model = on_model
        self._settings = settings
        self._key = signing_key(settings)
        self._topic = settings.kafka.topics.models
        self._model_name = model_name
        self._pinned: str | None = None
        self._assembler = ReleaseAssembler()
        # version -> the later release that superseded it (see the module docstring)
        self._superseded: OrderedDict[str, str] = OrderedDict()
        self._newest: str | None = None  # the last release accepted, in topic order
        self._consumer: AIOKafkaConsumer | None = None
        self._swap_lock = asyncio.Lock()
        self._first = asyncio.Event()
        self._caught_up = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------

    async def _start(self) -> None:
        """Connects, assigns every partition of the models topic from the beginning."""
        kafka = self._settings.kafka
        await ensure_topics(kafka, [self._topic])
        partitions = await topic_partitions(kafka, self._topic)
        consumer = create_consumer(kafka, group_id=None)
        await consumer.start()
        self._consumer = consumer
        try:
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends = await consumer.end_offsets(partitions)
        except BaseException:
            await consumer.stop()
            raise
        self.supervise(self._run(ends), name="model-releases")
        log.info("watching model releases: topic=%s end_offsets=%s", self._topic, _fmt(ends))

    async def _stop(self) -> None:
        await self._cancel_supervised()
        if self._consumer is not None:
            await stop_client(self._consumer, "the model releases' consumer")

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
        return self.catalog.active

    @property
    def pinned(self) -> str | None:
        """The version pinned with :meth:`pin`, or None when following new releases."""
        return self._pinned

    def history(self) -> list[ReleaseInfo]:
        """Every release seen (oldest first), with its status."""
        return self.catalog.history()

    # -- pinning ---------------------------------------------------------------------------

    async def pin(self, version: str) -> OnnxModel:
        """Serves a kept earlier (or any verified) version and stops following new releases.

        Raises:
            ReleaseError: ``unknown`` (never seen or rejected), ``evicted`` (its
                artifact, or for a head-only release its base's, is no longer
                kept) or ``load``.
        """
        release = self.catalog.get(version)
        if release is None or release.info.status == "rejected":
            why = "never seen" if release is None else f"rejected ({release.info.reason})"
            raise ReleaseError("unknown", f"version {version!r} is not a verified release: {why}")
        artifact, manifest = self.catalog.artifact(version), self.catalog.manifest(version)
        if artifact is None or manifest is None or not self.catalog.pinnable(version):
            base = self.catalog.base_of(version)
            what = f"version {version!r}" if artifact is None else f"its base {base!r}"
            raise ReleaseError(
                "evicted",
                f"{what} is no longer kept (only the last {self.catalog.keep} full releases "
                "and the head-only releases on them are)",
            )
        async with self._swap_lock:
            try:
                model = await self._load(manifest, artifact)
            except ReleaseError as exc:
                self._reject(manifest, exc)
                raise
            await self._hand_over(model, manifest, result="pinned")
            self._pinned = version
        return model

    async def unpin(self) -> OnnxModel | None:
        """Follows new releases again, swapping to the newest verified one now.

        Returns:
            The model swapped in, or None when the pinned one is already the newest.
        """
        self._pinned = None
        async with self._swap_lock:
            candidates = self.catalog.verified()
            if not candidates or candidates[-1].version == self.catalog.active:
                return None
            return await self._serve_newest(candidates)

    # -- the watch loop --------------------------------------------------------------------

    async def _run(self, ends: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        await self._catch_up(self._consumer, ends)
        async with self._swap_lock:
            backlog = self.catalog.verified()  # what the catch-up accepted and kept
            fresh = backlog and backlog[-1].version != self.catalog.active
            if fresh and self._pinned is None:
                await self._serve_newest(backlog)
        self._caught_up.set()
        log.info("model releases caught up: topic=%s active=%s", self._topic, self.active_version)
        while True:
            batches = await self._fetch(self._consumer, _POLL_MS)
            self._assembler.expire()  # a release stalled with chunks missing is refused
            for manifest, artifact in self._assemble(batches):
                async with self._swap_lock:
                    try:
                        await self._on_release(manifest, artifact)
                    except Exception:  # e.g. on_model failed: keep watching, old model serves
                        log.exception("handling release %s failed", manifest.version)

    async def _catch_up(self, consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> None:
        """Reads up to ``ends``, verifying the releases found into the catalog (not a list of
        every manifest: a models topic of a long run holds thousands)."""
        while True:
            # Some brokers (Tansu) report the last batch's base offset + 1 as the end:
            # past the reported end, read on until a poll comes back empty.
            reached = await self._reached(consumer, ends)
            batches = await self._fetch(consumer, _DRAIN_MS if reached else _POLL_MS)
            for manifest, artifact in self._assemble(batches):
                self._accept(manifest, artifact)
            if reached and not batches:
                return

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
        for refusal in self._assembler.take_refusals():
            self._refuse_unassembled(refusal)
        return complete

    async def _on_release(self, manifest: ModelManifest, artifact: bytes) -> None:
        """Handles a release that arrived after catch-up."""
        later = self._superseded.get(manifest.version)
        if later is not None:  # before the repeat check: an exact old copy is a replay too
            self._refuse_replay(manifest, later)
            return
        if self.catalog.seen(manifest):
            log.info("release %s seen before; ignoring the repeat", manifest.version)
            return
        if not self._accept(manifest, artifact):
            return
        if self._pinned is not None:
            log.info("release %s kept but not served: pinned to %s", manifest.version, self._pinned)
            return
        await self._serve_newest([manifest])

    def _accept(self, manifest: ModelManifest, artifact: bytes) -> bool:
        """Verifies a release and records it in the catalog; False when rejected."""
        later = self._superseded.get(manifest.version)
        if later is not None:
            self._refuse_replay(manifest, later)
            return False
        try:
            verify_release(manifest, artifact, self._key)
            self._check_base(manifest)
        except ReleaseError as exc:
            self._reject(manifest, exc)
            return False
        self.catalog.accept(manifest, artifact)
        self._supersede(manifest)
        return True

    def _supersede(self, manifest: ModelManifest) -> None:
        """Records what a verified release makes old: the release before it, its parents."""
        older = (self._newest, manifest.parent_version, manifest.spec.parent_version)
        for version in older:
            if version is not None and version != manifest.version:
                self._superseded.pop(version, None)
                self._superseded[version] = manifest.version
        while len(self._superseded) > _MAX_SUPERSEDED:
            self._superseded.popitem(last=False)
        self._newest = manifest.version

    def _refuse_replay(self, manifest: ModelManifest, later: str) -> None:
        """Counts and logs a replayed release; the catalog keeps the original as it was."""
        self.metrics.model_swaps.labels(result=self._result("replay")).inc()
        log.warning(
            "release replay refused: topic=%s model=%s version=%s result=%s: %s was "
            "superseded by %s (the serving model is %s); an old release published again "
            "is not served: pin it through the admin API (POST /v1/model/pin) to go back",
            self._topic,
            manifest.model_name,
            manifest.version,
            self._result("replay"),
            manifest.version,
            later,
            self.catalog.active,
        )

    def _refuse_unassembled(self, refusal: Refusal) -> None:
        """Counts and logs a release whose chunks conflict or are missing.

        It is recorded as rejected unless the same version is known good (a
        broken copy of a kept release must not make that release unpinnable).
        """
        manifest, error = refusal.manifest, ReleaseError(refusal.reason, refusal.detail)
        known = self.catalog.get(manifest.version)
        if known is None or known.info.status == "rejected":
            self._reject(manifest, error)
            return
        self.metrics.model_swaps.labels(result=self._result(error.reason)).inc()
        log.warning(
            "release copy refused: topic=%s model=%s version=%s result=%s: %s "
            "(the verified copy of that version is kept)",
            self._topic,
            manifest.model_name,
            manifest.version,
            self._result(error.reason),
            error.detail,
        )

    def _check_base(self, manifest: ModelManifest) -> None:
        """A head-only release needs its base: a verified full release whose artifact is kept.

        Raises:
            ReleaseError: ``base``.
        """
        base = manifest.base_version
        if base is None:
            return
        known = self.catalog.get(base)
        if known is None or known.info.status == "rejected" or known.base_version:
            why = "never seen" if known is None else "not a verified full release"
            raise ReleaseError(
                "base", f"head-only release {manifest.version} is for {base!r}: {why} here"
            )
        if self.catalog.artifact(base) is None:
            raise ReleaseError(
                "base",
                f"head-only release {manifest.version} is for {base!r}, which is no longer kept",
            )

    async def _serve_newest(self, candidates: list[ModelManifest]) -> OnnxModel | None:
        """Loads the newest candidate that loads (newest first) and hands it over."""
        for manifest in reversed(candidates):
            artifact = self.catalog.artifact(manifest.version)
            if artifact is None or not self.catalog.pinnable(manifest.version):
                continue  # evicted, or a head-only release whose base was
            try:
                model = await self._load(manifest, artifact)
            except ReleaseError as exc:
                self._reject(manifest, exc)
                continue
            await self._hand_over(model, manifest, result="ok")
            return model
        return None

    async def _load(self, manifest: ModelManifest, artifact: bytes) -> OnnxModel:
        """Loads and warms a model in a thread; checks its spec against the manifest.

        Raises:
            ReleaseError: ``load``, ``spec``, or ``evicted`` (a head-only release's base).
        """
        if manifest.base_version is not None:
            base = self.catalog.artifact(manifest.base_version)
            if base is None:
                raise ReleaseError("evicted", f"the base {manifest.base_version!r} is not kept")
            artifact = await asyncio.to_thread(with_head, base, manifest, artifact)
        try:
            model = await asyncio.to_thread(
                load_and_warm,
                artifact,
                self._settings.device,
                self._settings.scorer.inference_threads,
            )
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
        if self._on_model is not None:
            outcome = self._on_model(model, manifest)
            if inspect.isawaitable(outcome):
                await outcome
        previous = self.catalog.active
        self.catalog.active, self.model = manifest.version, model
        self.metrics.model_swaps.labels(result=result).inc()
        self.metrics.set_model(manifest.version, model.provider)
        unlearned = manifest.spec.labels_unlearned
        self.metrics.labels_unlearned.set(math.nan if unlearned is None else unlearned)
        self._first.set()
        log.info(
            "model swapped: topic=%s version=%s base=%s previous=%s provider=%s",
            self._topic,
            manifest.version,
            manifest.base_version,
            previous,
            model.provider,
        )

    @classmethod
    def _result(cls, reason: str) -> str:
        """The ``result`` label of a refused release."""
        return cls.swap_results.get(reason, f"rejected_{reason}")

    def _reject(self, manifest: ModelManifest, error: ReleaseError) -> None:
        result = self._result(error.reason)
        self.metrics.model_swaps.labels(result=result).inc()
        self.catalog.reject(manifest, error.reason)
        for version, later in list(self._superseded.items()):
            if later == manifest.version:  # a refused release supersedes nothing
                del self._superseded[version]
        log.warning(
            "release rejected: topic=%s model=%s version=%s result=%s: %s",
            self._topic,
            manifest.model_name,
            manifest.version,
            result,
            error.detail,
        )


def load_and_warm(artifact: bytes, device: Any, intra_op_threads: int | None = None) -> OnnxModel:
    """Loads a model from its bytes and runs it once, so the first batch pays no setup."""
    model = OnnxModel.load(artifact, device=device, intra_op_threads=intra_op_threads)
    model.warm_up()
    return model


def _fmt(ends: dict[TopicPartition, int]) -> str:
    return ",".join(f"{tp.partition}:{offset}" for tp, offset in sorted(ends.items()))
