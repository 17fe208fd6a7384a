"""The supervisor's HTTP app: one endpoint in front of the workers.

- ``/healthz``: the supervisor answers (it exits when it gives up on a worker).
- ``/readyz``: 200 only while every worker runs and its own ``/readyz`` is 200.
- ``/metrics``: every worker's series with a ``worker`` label, and the pool's
  (:mod:`service.workers.metrics`).
- ``/v1/status``, ``GET /v1/policy``, ``GET /v1/model``: each worker's answer,
  side by side (:mod:`service.workers.models`).
- ``PUT /v1/policy``, ``POST /v1/model/pin``, ``POST /v1/model/unpin``: to every
  worker or to none (:mod:`service.workers.fanout`), behind the admin token.
- ``POST /v1/frames``: ingest, served here (it only produces to Kafka).
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Response, status
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from schemas.api import (
    FrameCounts,
    Health,
    ModelPin,
    ModelStatus,
    PolicyState,
    PolicyUpdate,
    ScorerStatus,
)
from schemas.api_errors import error_responses
from service.config import Settings
from service.http.api import admin_check
from service.http.ingest import create_ingest_router
from service.http.tokens import check_tokens
from service.workers.client import Answer, WorkerUnreachable, call
from service.workers.fanout import AdminFanOut, FanOutRefused, Write
from service.workers.metrics import PoolMetrics, exposition, merge
from service.workers.models import (
    PoolModel,
    PoolPolicy,
    PoolReadiness,
    PoolStatus,
    WorkerModel,
    WorkerPolicy,
    WorkerReadiness,
    WorkerStatus,
    WorkerView,
)
from service.workers.pool import Worker, WorkerPool

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

PROBE_TIMEOUT_S = 3.0
SCRAPE_TIMEOUT_S = 10.0


def create_gateway(settings: Settings, pool: WorkerPool, fanout: AdminFanOut) -> FastAPI:
    """The app whose lifespan runs ``pool``; ``fanout`` carries the admin writes.

    Raises:
        ConfigError: the admin or an ingest token is empty or an example value.
    """
    check_tokens(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with pool:
            yield

    app = FastAPI(
        title="Winnow scorer (workers)",
        version="0.1.0",
        description="N scorer worker processes behind one endpoint (winnow serve --workers N).",
        lifespan=lifespan,
    )
    _ops_routes(app, pool)
    _scorer_routes(app, pool, fanout, admin_check(settings))
    app.include_router(create_ingest_router(settings))  # POST /v1/frames
    return app


def _ops_routes(app: FastAPI, pool: WorkerPool) -> None:
    """``/healthz``, ``/readyz`` and ``/metrics`` for all workers."""
    metrics = PoolMetrics()

    @app.get("/healthz", response_model=Health, tags=["ops"])
    async def healthz() -> Health:
        return Health()

    @app.get(
        "/readyz",
        response_model=PoolReadiness,
        tags=["ops"],
        responses={503: {"model": PoolReadiness}},
    )
    async def readyz(response: Response) -> PoolReadiness:
        answers = await _ask_all(pool, "/readyz", PROBE_TIMEOUT_S)
        workers = [_readiness(worker, answers.get(worker.index)) for worker in pool.workers]
        ready = pool.all_running and all(w.ready for w in workers)
        if not ready:
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return PoolReadiness(
            ready=ready,
            model_loaded=bool(workers) and all(w.model_loaded for w in workers),
            partitions_assigned=sum(w.partitions_assigned for w in workers),
            workers=workers,
        )

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def get_metrics() -> Response:
        answers = await _ask_all(pool, "/metrics", SCRAPE_TIMEOUT_S)
        texts = {index: a.body.decode() for index, a in answers.items() if a.ok}
        metrics.observe(pool.workers, texts)
        body = exposition(merge(texts), metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)


def _scorer_routes(
    app: FastAPI, pool: WorkerPool, fanout: AdminFanOut, require_admin: Callable[..., None]
) -> None:
    """``/v1/status``, the policy and the model: each worker's view; writes to all."""
    admin = [Depends(require_admin)]
    write = error_responses(400, 401, 403, 422, 502, 503)
    model_write = error_responses(400, 401, 403, 404, 409, 422, 502, 503)
    started_at = datetime.now(UTC)

    @app.get("/v1/status", response_model=PoolStatus, tags=["scorer"])
    async def get_status() -> PoolStatus:
        answers = await _ask_all(pool, "/v1/status", PROBE_TIMEOUT_S)
        workers = [
            WorkerStatus(
                **WorkerView.of(w).model_dump(),
                status=_parsed(ScorerStatus, answers.get(w.index)),
            )
            for w in pool.workers
        ]
        statuses = [w.status for w in workers if w.status is not None]
        return PoolStatus(
            ready=pool.all_running
            and len(statuses) == len(workers)
            and all(s.ready for s in statuses),
            started_at=started_at,
            frames=FrameCounts(
                selected=sum(s.frames.selected for s in statuses),
                not_selected=sum(s.frames.not_selected for s in statuses),
                invalid=sum(s.frames.invalid for s in statuses),
            ),
            partitions=sorted({p for s in statuses for p in s.partitions}),
            model_versions=sorted({s.model.version for s in statuses if s.model is not None}),
            workers=workers,
        )

    @app.get("/v1/policy", response_model=PoolPolicy, tags=["policy"])
    async def get_policy() -> PoolPolicy:
        return _policies(pool.workers, await _ask_all(pool, "/v1/policy", PROBE_TIMEOUT_S))

    @app.put(
        "/v1/policy",
        response_model=PoolPolicy,
        tags=["policy"],
        dependencies=admin,
        responses=write,
    )
    async def put_policy(change: PolicyUpdate) -> PoolPolicy:
        body = change.model_dump_json(exclude_unset=True).encode()
        answers = await _apply(fanout, pool, Write("PUT", "/v1/policy", body))
        log.info("policy changed on every worker: %s", change.model_dump(exclude_none=True))
        return _policies(pool.workers, answers)

    @app.get("/v1/model", response_model=PoolModel, tags=["model"])
    async def get_model() -> PoolModel:
        return _models(pool.workers, await _ask_all(pool, "/v1/model", PROBE_TIMEOUT_S))

    @app.post(
        "/v1/model/pin",
        response_model=PoolModel,
        tags=["model"],
        dependencies=admin,
        responses=model_write,
    )
    async def pin_model(pin: ModelPin) -> PoolModel:
        answers = await _apply(
            fanout, pool, Write("POST", "/v1/model/pin", pin.model_dump_json().encode())
        )
        log.info("model pinned to %s on every worker", pin.version)
        return _models(pool.workers, answers)

    @app.post(
        "/v1/model/unpin",
        response_model=PoolModel,
        tags=["model"],
        dependencies=admin,
        responses=model_write,
    )
    async def unpin_model() -> PoolModel:
        return _models(pool.workers, await _apply(fanout, pool, Write("POST", "/v1/model/unpin")))


async def _ask_all(pool: WorkerPool, path: str, timeout: float) -> dict[int, Answer]:  # noqa: ASYNC109
    """``GET path`` of every running worker, at once; the answers by worker."""
    running = [worker for worker in pool.workers if worker.running]

    async def ask(worker: Worker) -> Answer | None:
        try:
            return await call(worker.socket, "GET", path, timeout=timeout)
        except WorkerUnreachable as error:
            log.warning("worker %d: %s", worker.index, error)
            return None

    answers = await asyncio.gather(*(ask(worker) for worker in running))
    return {w.index: a for w, a in zip(running, answers, strict=True) if a is not None}


async def _apply(fanout: AdminFanOut, pool: WorkerPool, write: Write) -> dict[int, Answer]:
    try:
        return await fanout.apply(pool.workers, write)
    except FanOutRefused as refused:
        raise HTTPException(refused.status, refused.detail) from refused


def _parsed(model: type[M], answer: Answer | None) -> M | None:
    """A worker's answer as ``model``; None when it gave none, an error (e.g. 503) or
    something else (logged: a worker of another version, say)."""
    if answer is None or not answer.ok:
        return None
    try:
        return model.model_validate_json(answer.body)
    except ValidationError as error:
        log.warning("a worker's answer is not a %s: %s", model.__name__, error)
        return None


def _readiness(worker: Worker, answer: Answer | None) -> WorkerReadiness:
    body: dict[str, Any] = {}
    if answer is not None:
        try:
            body = answer.json()
        except ValueError:
            body = {}
    return WorkerReadiness(
        **WorkerView.of(worker).model_dump(),
        ready=worker.running and answer is not None and answer.ok,
        model_loaded=bool(body.get("model_loaded", False)),
        partitions_assigned=int(body.get("partitions_assigned", 0)),
    )


def _policies(workers: list[Worker], answers: dict[int, Answer]) -> PoolPolicy:
    return PoolPolicy(
        workers=[
            WorkerPolicy(
                **WorkerView.of(w).model_dump(), policy=_parsed(PolicyState, answers.get(w.index))
            )
            for w in workers
        ]
    )


def _models(workers: list[Worker], answers: dict[int, Answer]) -> PoolModel:
    return PoolModel(
        workers=[
            WorkerModel(
                **WorkerView.of(w).model_dump(), model=_parsed(ModelStatus, answers.get(w.index))
            )
            for w in workers
        ]
    )
