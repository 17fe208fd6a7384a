"""The scorer's HTTP API: health, readiness, metrics, status and live policy.

The consume loop runs inside the app's lifespan, so ``uvicorn`` (or a test's
``TestClient``) starts and stops the scorer with the app.
"""

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from infra.kafka.admin import ensure_winnow_topics
from schemas.api import (
    FrameCounts,
    Health,
    ModelInfo,
    ModelPin,
    ModelStatus,
    PolicyState,
    PolicyUpdate,
    Readiness,
    ScorerStatus,
)
from service.config import DriftSettings, Settings
from service.drift.monitor import AlarmListener, DriftMonitor
from service.errors import ConfigError
from service.http.ingest import create_ingest_router
from service.metrics import ScorerMetrics
from service.model.inference import OnnxModel
from service.model.verification import ReleaseError
from service.model.watcher import ModelReleases
from service.pipeline.accounting import Accounting
from service.pipeline.scorer import Scorer
from service.scoring.engine import ScoringEngine
from service.selection.policy import QueryPolicy
from service.selection.stopping import LabelFeedback

log = logging.getLogger(__name__)
_bearer = HTTPBearer(auto_error=False)


def create_app(settings: Settings, model: OnnxModel | None = None) -> FastAPI:
    """Builds the app; its lifespan loads the model, creates topics and runs the scorer.

    Args:
        settings: everything ``winnow serve`` reads from the environment.
        model: an already loaded model (else ``settings.scorer.model_path`` is loaded).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ensure_winnow_topics(settings.kafka)
        metrics = ScorerMetrics()
        loaded = model or _load_model(settings)
        async with AsyncExitStack() as stack:
            releases = None
            serving: list[Scorer] = []  # the scorer once built; earlier releases wait as .model
            if settings.scorer.follow_releases:
                releases = ModelReleases(
                    settings,
                    on_model=lambda new, _manifest: serving[0].swap_model(new) if serving else None,
                    metrics=metrics,
                    current_version=loaded and loaded.version,
                    keep_artifacts=settings.scorer.keep_releases,
                )
                await stack.enter_async_context(releases)
                loaded = loaded or await _first_release(releases, settings)
            if loaded is None:
                raise ConfigError(
                    "no model: pass --model PATH.onnx, or let the scorer follow releases"
                )
            policy = QueryPolicy.from_settings(settings.policy)
            feedback = LabelFeedback(settings.kafka, metrics)
            await stack.enter_async_context(feedback)
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
            )
            serving.append(scorer)
            await stack.enter_async_context(scorer)
            app.state.drift, app.state.feedback = drift, feedback
            if releases is not None:
                if releases.model is not None and releases.model is not scorer.model:
                    scorer.swap_model(releases.model)  # a release landed while starting
            app.state.scorer, app.state.releases = scorer, releases
            watcher = asyncio.create_task(_watch(app, scorer))
            try:
                yield
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)

    app = FastAPI(
        title="Winnow scorer",
        version="0.1.0",
        description="Streaming active learning: scores frames and routes the informative ones.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.failure = None
    _routes(app)
    app.include_router(create_ingest_router(settings))  # POST /v1/frames
    return app


def boost_on_alarm(policy: QueryPolicy, drift: DriftSettings) -> AlarmListener:
    """The response to a drift alarm: more labels for a while, so the new regime is learned."""

    def boost(_event: object) -> None:
        if drift.boost_factor > 1:
            policy.boost(drift.boost_factor, drift.boost_seconds)

    return boost


def _load_model(settings: Settings) -> OnnxModel | None:
    if settings.scorer.model_path is None:
        return None
    return OnnxModel.load(settings.scorer.model_path, device=settings.device)


async def _first_release(releases: ModelReleases, settings: Settings) -> OnnxModel:
    log.info(
        "no model file given: waiting for the first release on %s (start `winnow train`)",
        settings.kafka.topics.models,
    )
    return await releases.wait_for_first()


async def _watch(app: FastAPI, scorer: Scorer) -> None:
    try:
        await scorer.wait()
    except Exception as error:
        app.state.failure = error
        log.exception("the scorer stopped with an error; /readyz now answers 503")
        on_failure = getattr(app.state, "on_failure", None)
        if on_failure is not None:
            on_failure()
        raise


def _scorer(request: Request) -> Scorer:
    scorer: Scorer | None = getattr(request.app.state, "scorer", None)
    if scorer is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the scorer is not running")
    return scorer


def _require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    token = request.app.state.settings.admin_token
    if token is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "writes are disabled: set WINNOW_ADMIN_TOKEN to enable them"
        )
    given = credentials.credentials if credentials else ""
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a valid admin bearer token is needed",
            headers={"WWW-Authenticate": "Bearer"},
        )


ScorerDep = Annotated[Scorer, Depends(_scorer)]


def _routes(app: FastAPI) -> None:
    @app.get("/healthz", response_model=Health, tags=["ops"])
    async def healthz() -> Health:
        return Health()

    @app.get("/readyz", response_model=Readiness, tags=["ops"])
    async def readyz(request: Request, response: Response) -> Readiness:
        scorer: Scorer | None = getattr(request.app.state, "scorer", None)
        failed = request.app.state.failure is not None
        assigned = len(scorer.assigned) if scorer else 0
        ready = scorer is not None and not failed and assigned > 0
        if not ready:
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return Readiness(ready=ready, model_loaded=scorer is not None, partitions_assigned=assigned)

    @app.get("/metrics", tags=["ops"])
    async def metrics(request: Request, scorer: ScorerDep) -> Response:
        drift: DriftMonitor | None = getattr(request.app.state, "drift", None)
        if drift is not None:
            drift.update_gauges()
        return Response(generate_latest(scorer.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/status", response_model=ScorerStatus, tags=["scorer"])
    async def get_status(request: Request, scorer: ScorerDep) -> ScorerStatus:
        policy = scorer.policy.state()
        return ScorerStatus(
            ready=request.app.state.failure is None and bool(scorer.assigned),
            started_at=scorer.started_at,
            model=_model_info(scorer),
            policy=policy,
            frames=FrameCounts(**scorer.accounting.counts),
            partitions=[f"{tp.topic}:{tp.partition}" for tp in scorer.assigned],
            labeling=request.app.state.feedback.status(policy, scorer.policy.window_limit),
            drift=drift.status() if (drift := getattr(request.app.state, "drift", None)) else None,
        )

    @app.get("/v1/policy", response_model=PolicyState, tags=["policy"])
    async def get_policy(scorer: ScorerDep) -> PolicyState:
        return scorer.policy.state()

    @app.put(
        "/v1/policy",
        response_model=PolicyState,
        tags=["policy"],
        dependencies=[Depends(_require_admin)],
    )
    async def put_policy(change: PolicyUpdate, scorer: ScorerDep) -> PolicyState:
        try:
            state = scorer.policy.update(change)
        except ValueError as error:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error)) from error
        log.info("policy changed: %s", change.model_dump(exclude_none=True))
        return state

    @app.get("/v1/model", response_model=ModelStatus, tags=["model"])
    async def get_model(request: Request, scorer: ScorerDep) -> ModelStatus:
        releases: ModelReleases | None = request.app.state.releases
        return ModelStatus(
            current=_model_info(scorer),
            pinned=releases.pinned if releases else None,
            following_releases=releases is not None,
            history=list(releases.history()) if releases else [],
        )

    @app.post(
        "/v1/model/pin",
        response_model=ModelStatus,
        tags=["model"],
        dependencies=[Depends(_require_admin)],
    )
    async def pin_model(pin: ModelPin, request: Request, scorer: ScorerDep) -> ModelStatus:
        releases = _releases(request)
        try:
            await releases.pin(pin.version)
        except ReleaseError as error:
            code = {"unknown": 404, "evicted": 409}.get(error.reason, 422)
            raise HTTPException(code, str(error)) from error
        log.info("model pinned to %s", pin.version)
        return await get_model(request, scorer)

    @app.post(
        "/v1/model/unpin",
        response_model=ModelStatus,
        tags=["model"],
        dependencies=[Depends(_require_admin)],
    )
    async def unpin_model(request: Request, scorer: ScorerDep) -> ModelStatus:
        await _releases(request).unpin()
        return await get_model(request, scorer)


def _releases(request: Request) -> ModelReleases:
    releases: ModelReleases | None = request.app.state.releases
    if releases is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            "this scorer does not follow releases (WINNOW_SCORER_FOLLOW_RELEASES)",
        )
    return releases


def _model_info(scorer: Scorer) -> ModelInfo:
    spec = scorer.model.spec
    return ModelInfo(
        version=scorer.model.version,
        arch=spec.arch,
        classes=spec.classes,
        input_size=spec.input_size,
        provider=scorer.model.provider,
        labels_trained=spec.labels_trained,
        parent_version=spec.parent_version,
    )
