"""The scorer's HTTP API: health, readiness, metrics, status, live policy and model pins.

The app's lifespan runs the composition root (:func:`service.runtime.run_scorer`),
so ``uvicorn`` (or a test's ``TestClient``) starts and stops the scorer with the
app; handlers read the typed :class:`~service.runtime.ScorerRuntime` from the
lifespan state.
"""

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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
from schemas.api_errors import error_responses
from service.config import Settings
from service.http.ingest import create_ingest_router
from service.http.tokens import check_tokens, matching
from service.model.inference import OnnxModel
from service.model.verification import ReleaseError
from service.model.watcher import ModelReleases
from service.pipeline.scorer import Scorer
from service.runtime import ScorerRuntime, ScorerState, run_scorer

log = logging.getLogger(__name__)
_bearer = HTTPBearer(auto_error=False)


def create_app(
    settings: Settings,
    model: OnnxModel | None = None,
    *,
    on_failure: Callable[[], None] | None = None,
    on_started: Callable[[ScorerRuntime], None] | None = None,
) -> FastAPI:
    """Builds the app; its lifespan runs the scorer (:func:`service.runtime.run_scorer`).

    Args:
        settings: everything ``winnow serve`` reads from the environment.
        model: an already loaded model (else ``settings.scorer.model_path``, else
            the first release).
        on_failure: called once if the scorer stops with an error.
        on_started: called with the runtime once every part runs (the demo reads it).

    Raises:
        ConfigError: the admin or an ingest token is empty or an example value.
    """
    check_tokens(settings)  # before anything starts: a guessable token is no guard

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[ScorerState]:
        async with run_scorer(settings, model, on_failure=on_failure) as runtime:
            if on_started is not None:
                on_started(runtime)
            yield {"runtime": runtime}

    app = FastAPI(
        title="Winnow scorer",
        version="0.1.0",
        description="Streaming active learning: scores frames and routes the informative ones.",
        lifespan=lifespan,
    )
    _routes(app, admin_check(settings))
    app.include_router(create_ingest_router(settings))  # POST /v1/frames
    return app


def _runtime(request: Request) -> ScorerRuntime:
    runtime: ScorerRuntime | None = getattr(request.state, "runtime", None)
    if runtime is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the scorer is not running")
    return runtime


RuntimeDep = Annotated[ScorerRuntime, Depends(_runtime)]


def admin_check(settings: Settings) -> Callable[..., None]:
    """The dependency that guards writes with ``WINNOW_ADMIN_TOKEN`` (constant-time compare)."""

    def require_admin(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        token = settings.admin_token
        if token is None:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                "writes are disabled: set WINNOW_ADMIN_TOKEN to enable them",
            )
        given = credentials.credentials if credentials else ""
        if matching(given, [token.get_secret_value()]) is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "a valid admin bearer token is needed",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_admin


def _routes(app: FastAPI, require_admin: Callable[..., None]) -> None:
    admin = [Depends(require_admin)]
    # Every status a route can answer is declared, so clients (and the schema tests) know them.
    read = error_responses(503)
    write = error_responses(400, 401, 403, 422, 503)
    model_write = error_responses(400, 401, 403, 404, 409, 422, 503)

    @app.get("/healthz", response_model=Health, tags=["ops"])
    async def healthz() -> Health:
        return Health()

    @app.get(
        "/readyz", response_model=Readiness, tags=["ops"], responses={503: {"model": Readiness}}
    )
    async def readyz(request: Request, response: Response) -> Readiness:
        runtime: ScorerRuntime | None = getattr(request.state, "runtime", None)
        assigned = len(runtime.scorer.assigned) if runtime else 0
        ready = runtime is not None and runtime.ready
        if not ready:
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return Readiness(
            ready=ready, model_loaded=runtime is not None, partitions_assigned=assigned
        )

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse, responses=read)
    async def metrics(runtime: RuntimeDep) -> Response:
        if runtime.drift is not None:
            runtime.drift.update_gauges()
        policy = runtime.policy.state()
        runtime.metrics.set_policy(policy)
        runtime.feedback.update_gauges(policy, runtime.policy.window_limit)
        await runtime.scorer.refresh_lag()
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/status", response_model=ScorerStatus, tags=["scorer"], responses=read)
    async def get_status(runtime: RuntimeDep) -> ScorerStatus:
        scorer, policy = runtime.scorer, runtime.policy.state()
        return ScorerStatus(
            ready=runtime.ready,
            started_at=scorer.started_at,
            model=_model_info(scorer),
            policy=policy,
            frames=FrameCounts(**scorer.accounting.counts),
            partitions=[f"{tp.topic}:{tp.partition}" for tp in scorer.assigned],
            labeling=runtime.feedback.status(policy, runtime.policy.window_limit),
            drift=runtime.drift.status() if runtime.drift else None,
        )

    @app.get("/v1/policy", response_model=PolicyState, tags=["policy"], responses=read)
    async def get_policy(runtime: RuntimeDep) -> PolicyState:
        return runtime.policy.state()

    @app.put(
        "/v1/policy",
        response_model=PolicyState,
        tags=["policy"],
        dependencies=admin,
        responses=write,
    )
    async def put_policy(change: PolicyUpdate, runtime: RuntimeDep) -> PolicyState:
        try:
            state = runtime.policy.update(change)
        except ValueError as error:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error)) from error
        log.info("policy changed: %s", change.model_dump(exclude_none=True))
        return state

    @app.get("/v1/model", response_model=ModelStatus, tags=["model"], responses=read)
    async def get_model(runtime: RuntimeDep) -> ModelStatus:
        releases = runtime.releases
        return ModelStatus(
            current=_model_info(runtime.scorer),
            pinned=releases.pinned if releases else None,
            following_releases=releases is not None,
            history=list(releases.history()) if releases else [],
        )

    @app.post(
        "/v1/model/pin",
        response_model=ModelStatus,
        tags=["model"],
        dependencies=admin,
        responses=model_write,
    )
    async def pin_model(pin: ModelPin, runtime: RuntimeDep) -> ModelStatus:
        try:
            await _releases(runtime).pin(pin.version)
        except ReleaseError as error:
            code = {"unknown": 404, "evicted": 409}.get(error.reason, 422)
            raise HTTPException(code, str(error)) from error
        log.info("model pinned to %s", pin.version)
        return await get_model(runtime)

    @app.post(
        "/v1/model/unpin",
        response_model=ModelStatus,
        tags=["model"],
        dependencies=admin,
        responses=model_write,
    )
    async def unpin_model(runtime: RuntimeDep) -> ModelStatus:
        await _releases(runtime).unpin()
        return await get_model(runtime)


def _releases(runtime: ScorerRuntime) -> ModelReleases:
    if runtime.releases is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            "this scorer does not follow releases (WINNOW_SCORER_FOLLOW_RELEASES)",
        )
    return runtime.releases


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
        labels_unlearned=spec.labels_unlearned,
    )
