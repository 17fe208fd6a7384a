"""The composition root of ``winnow serve``: every online part, built and connected here.

Parts never append themselves to each other's lists or set each other's
attributes: each one gets its collaborators as constructor arguments or
callbacks, wired in :func:`run_scorer`. A drift alarm reaches the budget
through :func:`boost_on_alarm`; a verified release reaches the scorer through
the watcher's ``on_model``; each answer to the scorer's label requests reaches
the policy through the label feedback's ``on_answer`` (the model's measured
accuracy sets the uncertainty blend, the answer rate the backpressure). The
HTTP app's lifespan runs :func:`run_scorer` and hands the :class:`ScorerRuntime`
to the request handlers as typed lifespan state; the demo gets the same object
through ``on_started``.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypedDict

from infra.asyncio_tasks import track_asyncio_tasks
from infra.errors import WinnowError
from infra.kafka.admin import ensure_winnow_topics
from infra.kafka.outage import BrokerWatch, describe_fatal, is_fatal
from schemas.drift import DriftEvent
from schemas.models import ModelManifest
from service.config import DriftSettings, Settings
from service.drift.monitor import AlarmListener, DriftMonitor
from service.errors import ConfigError
from service.metrics import ScorerMetrics
from service.model.inference import OnnxModel
from service.model.watcher import ModelReleases
from service.pipeline.accounting import Accounting
from service.pipeline.scorer import Scorer
from service.scoring.engine import ScoringEngine
from service.selection.policy import QueryPolicy
from service.selection.stopping import LabelFeedback

log = logging.getLogger(__name__)


@dataclass
class ScorerRuntime:
    """A running scorer and the parts around it, as the HTTP handlers and the demo see them.

    Attributes:
        failure: the error the scorer stopped with, if it did; readiness reads it.
        broker: whether the broker answers; readiness reads it (None: not watched).
    """

    settings: Settings
    metrics: ScorerMetrics
    policy: QueryPolicy
    scorer: Scorer
    feedback: LabelFeedback
    releases: ModelReleases | None
    drift: DriftMonitor | None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    failure: BaseException | None = None
    broker: BrokerWatch | None = None

    @property
    def ready(self) -> bool:
        """Serving: no failure, the broker answers, and at least one frames partition assigned."""
        reachable = self.broker is None or self.broker.reachable
        return self.failure is None and reachable and bool(self.scorer.assigned)


class ScorerState(TypedDict):
    """The lifespan state of the scorer's app (``request.state.runtime``)."""

    runtime: ScorerRuntime


def boost_on_alarm(policy: QueryPolicy, drift: DriftSettings) -> AlarmListener:
    """The response to a drift alarm: more labels for a while, so the new regime is learned."""

    def boost(_event: DriftEvent) -> None:
        if drift.boost_factor > 1:
            policy.boost(drift.boost_factor, drift.boost_seconds)

    return boost


@asynccontextmanager
async def run_scorer(
    settings: Settings,
    model: OnnxModel | None = None,
    *,
    on_failure: Callable[[], None] | None = None,
) -> AsyncIterator[ScorerRuntime]:
    """Builds, connects and starts every online part; stops them in reverse order on exit.

    Args:
        settings: everything ``winnow serve`` reads from the environment.
        model: an already loaded model; else ``settings.scorer.model_path``, else
            the first verified release on the models topic.
        on_failure: called once if the scorer stops with an error (``winnow serve``
            stops the HTTP server with it, so the orchestrator restarts the pod).

    Raises:
        ConfigError: no model to serve and releases are not followed.
    """
    await ensure_winnow_topics(settings.kafka)
    metrics = ScorerMetrics()
    track_asyncio_tasks(metrics.registry)
    metrics.gpu_requested.set(settings.device == "cuda" or settings.gpu_requested)
    loaded = model or _load_model(settings)
    async with AsyncExitStack() as stack:
        # First in, last out: it also quiets the clients' retries while the others stop.
        broker = await stack.enter_async_context(BrokerWatch(settings.kafka, "scorer"))
        built: list[Scorer] = []  # swaps before the scorer exists are picked up below

        def swap(new: OnnxModel, _manifest: ModelManifest) -> None:
            if built:
                built[0].swap_model(new)

        releases = None
        if settings.scorer.follow_releases:
            releases = ModelReleases(
                settings,
                on_model=swap,
                metrics=metrics,
                current_version=loaded.version if loaded else None,
                keep_artifacts=settings.scorer.keep_releases,
            )
            await stack.enter_async_context(releases)
            loaded = loaded or await _first_release(releases, settings)
        if loaded is None:
            raise ConfigError("no model: pass --model PATH.onnx, or let the scorer follow releases")
        policy = QueryPolicy.from_settings(settings.policy)
        feedback = await stack.enter_async_context(
            LabelFeedback(settings.kafka, metrics, on_answer=policy.on_answer)
        )
        drift = None
        if settings.drift.enabled:
            drift = DriftMonitor(
                settings.drift,
                settings.kafka,
                metrics,
                on_alarm=boost_on_alarm(policy, settings.drift),
            )
            await stack.enter_async_context(drift)
        scorer = Scorer(
            settings,
            loaded,
            metrics=metrics,
            policy=policy,
            engine=ScoringEngine.from_settings(settings.policy),
            accounting=Accounting(metrics, policy, feedback=feedback),
            on_batch=[drift.observe] if drift else (),
            on_swap=[drift.on_swap] if drift else (),  # hears the first model too
            broker_reachable=lambda: broker.reachable,
        )
        built.append(scorer)
        await stack.enter_async_context(scorer)
        if releases is not None and releases.model is not None and releases.model is not loaded:
            scorer.swap_model(releases.model)  # a release landed while starting
        runtime = ScorerRuntime(
            settings, metrics, policy, scorer, feedback, releases, drift, broker=broker
        )
        watcher = asyncio.create_task(_watch(runtime, on_failure), name="scorer-watch")
        try:
            yield runtime
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)


def _load_model(settings: Settings) -> OnnxModel | None:
    if settings.scorer.model_path is None:
        return None
    return OnnxModel.load(
        settings.scorer.model_path,
        device=settings.device,
        intra_op_threads=settings.scorer.inference_threads,
    )


async def _first_release(releases: ModelReleases, settings: Settings) -> OnnxModel:
    log.info(
        "no model file given: waiting for the first release on %s (start `winnow train`)",
        settings.kafka.topics.models,
    )
    return await releases.wait_for_first()


async def _watch(runtime: ScorerRuntime, on_failure: Callable[[], None] | None) -> None:
    try:
        await runtime.scorer.wait()
    except Exception as error:
        runtime.failure = error
        if is_fatal(error):  # one clear line: a traceback would add nothing to fix it
            log.error("%s; /readyz now answers 503", describe_fatal("scorer", error))
        elif isinstance(error, WinnowError):  # a stall, or another reason given on purpose
            log.error("%s; /readyz now answers 503", error)
        else:
            log.exception("the scorer stopped with an error; /readyz now answers 503")
        if on_failure is not None:
            on_failure()
        raise
