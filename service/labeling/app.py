"""``winnow label-app``: the labeling team's web app.

Server-rendered HTML (Jinja2, autoescaped) plus one small vanilla JS file.
JSON API (all POSTs need a session and the CSRF header):

* ``POST /api/next`` → ``{"lease": {...} | null, "stats": {...}}``
* ``POST /api/answer`` ``{"lease_id", "label"}`` or ``{"lease_id", "status": "unlabelable"}``
* ``POST /api/skip`` ``{"lease_id"}`` → the frame goes back to the pool
* ``POST /api/undo`` → a correction lease on the labeler's last answer
* ``GET /api/stats``

Ops: ``/healthz``, ``/readyz`` (503 while the broker is unreachable or no
label-request partition is assigned, as the scorer's), ``/metrics``.
"""

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict
from urllib.parse import parse_qs

from aiokafka.errors import KafkaError
from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from infra.asyncio_tasks import track_asyncio_tasks
from infra.errors import WinnowError
from infra.kafka.admin import ensure_topics
from infra.kafka.outage import BrokerWatch, describe_fatal, is_fatal
from infra.kafka.settings import KafkaSettings
from schemas.api_errors import error_responses
from schemas.frames import CONTENT_TYPES
from service.config import LabelAppSettings
from service.labeling.auth import Sessions, labeler, same_origin
from service.labeling.leases import Lease, LeaseError
from service.labeling.queue import LabelQueue

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

Labeler = Annotated[str, Depends(labeler)]


class Answer(BaseModel):
    lease_id: str
    label: str | None = None
    status: Literal["labeled", "unlabelable"] = "labeled"


class LeaseRef(BaseModel):
    lease_id: str = Field(max_length=64)


class Readiness(BaseModel):
    """``/readyz``: serving frames and taking answers (503 when not)."""

    ready: bool
    broker_reachable: bool
    partitions_assigned: int


class LabelAppState(TypedDict):
    """The lifespan state of the label app; handlers read it as ``request.state.x``."""

    broker: BrokerWatch
    queue: LabelQueue
    sessions: Sessions
    templates: Jinja2Templates


def create_label_app(
    kafka: KafkaSettings,
    settings: LabelAppSettings,
    *,
    on_failure: Callable[[], None] | None = None,
) -> FastAPI:
    """Builds the app; its lifespan creates the topics and runs the :class:`LabelQueue`.

    Args:
        kafka: where the broker is.
        settings: ``WINNOW_LABEL_APP_*``.
        on_failure: called once if the queue stops with an error (``winnow label-app``
            then exits 1, so the orchestrator restarts it).

    Raises:
        ConfigError: no team or user token is configured.
    """
    sessions = Sessions(settings)  # here, not in the lifespan: a bad config fails at once
    templates = Jinja2Templates(directory=HERE / "templates")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[LabelAppState]:
        async with BrokerWatch(kafka, "label-app") as broker:  # stopped last: quiets retries
            await ensure_topics(kafka, [kafka.topics.label_requests, kafka.topics.labels])
            async with LabelQueue(kafka, settings) as queue, _watched(queue, on_failure):
                track_asyncio_tasks(queue.registry)
                yield {
                    "broker": broker,
                    "queue": queue,
                    "sessions": sessions,
                    "templates": templates,
                }

    app = FastAPI(title="Winnow labeling", version="0.1.0", lifespan=lifespan)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    _pages(app)
    _api(app)
    return app


@asynccontextmanager
async def _watched(queue: LabelQueue, on_failure: Callable[[], None] | None) -> AsyncIterator[None]:
    """Reports a failure of the queue's loop at once: one line, and ``on_failure``."""

    async def watch() -> None:
        try:
            await queue.wait()
        except Exception as error:
            if is_fatal(error):  # one clear line: a traceback would add nothing to fix it
                log.error("%s; /readyz now answers 503", describe_fatal("label-app", error))
            elif isinstance(error, WinnowError):  # a reason given on purpose: one line
                log.error("the label queue stopped: %s; /readyz now answers 503", error)
            else:
                log.exception("the label queue stopped with an error; /readyz now answers 503")
            if on_failure is not None:
                on_failure()

    task = asyncio.create_task(watch(), name="label-queue-watch")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def lease_json(lease: Lease) -> dict[str, Any]:
    """What the page needs to show a frame; the image as a data URL of a known type."""
    r = lease.frame.request
    content_type = r.content_type if r.content_type in CONTENT_TYPES else "image/png"
    return {
        "lease_id": lease.id,
        "correction": lease.correction,
        "previous": lease.frame.answers.get(lease.annotator) if lease.correction else None,
        "frame": {
            "frame_id": r.frame_id,
            "source_id": r.source_id,
            "captured_at": r.captured_at.isoformat() if r.captured_at else None,
            "model_version": r.model_version,
            "classes": r.classes,
            "prediction": r.label,
            "confidence": r.confidence,
            "reason": r.decision.reason,
            "policy": r.decision.policy,
            "utility": r.decision.utility,
            "scores": r.scores.model_dump(),
            "image": f"data:{content_type};base64,{base64.b64encode(r.image).decode()}",
        },
    }


def _queue(request: Request) -> LabelQueue:
    queue: LabelQueue | None = getattr(request.state, "queue", None)
    if queue is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the label queue is not running")
    return queue


def _sessions(request: Request) -> Sessions:
    sessions: Sessions = request.state.sessions
    return sessions


def _templates(request: Request) -> Jinja2Templates:
    templates: Jinja2Templates = request.state.templates
    return templates


Queue = Annotated[LabelQueue, Depends(_queue)]
SessionsDep = Annotated[Sessions, Depends(_sessions)]
Templates = Annotated[Jinja2Templates, Depends(_templates)]


def _pages(app: FastAPI) -> None:
    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz", response_model=Readiness, tags=["ops"], responses={503: {"model": Readiness}}
    )
    async def readyz(request: Request, response: Response) -> Readiness:
        broker: BrokerWatch | None = getattr(request.state, "broker", None)
        queue: LabelQueue | None = getattr(request.state, "queue", None)
        reachable = broker is not None and broker.reachable
        assigned = len(queue.assigned) if queue is not None else 0
        ready = reachable and assigned > 0 and queue is not None and queue.failure is None
        if not ready:
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return Readiness(ready=ready, broker_reachable=reachable, partitions_assigned=assigned)

    @app.get(
        "/metrics", tags=["ops"], response_class=PlainTextResponse, responses=error_responses(503)
    )
    async def metrics(queue: Queue) -> Response:
        queue.update_gauges()
        return Response(generate_latest(queue.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login_page(
        request: Request, templates: Templates, error: str | None = None
    ) -> Response:
        return templates.TemplateResponse(request, "login.html", {"error": error})

    @app.post("/login", include_in_schema=False)
    async def login(request: Request, sessions: SessionsDep, templates: Templates) -> Response:
        if not same_origin(request):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "cross-site sign-in refused")
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        name = sessions.sign_in(form.get("name", [""])[0], form.get("token", [""])[0])
        if name is None:
            page = templates.TemplateResponse(
                request, "login.html", {"error": "Wrong name or token."}, status_code=401
            )
            return page
        response = RedirectResponse("/", status_code=status.HTTP_303_SEE_OTHER)
        sessions.set_cookie(response, name)
        log.info("labeler %s signed in", name)
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request, sessions: SessionsDep) -> Response:
        if not same_origin(request):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "cross-site sign-out refused")
        response = RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)
        sessions.clear_cookie(response)
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def label_page(request: Request, sessions: SessionsDep, templates: Templates) -> Response:
        name = sessions.user(request)
        if name is None:
            return RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)
        queue = _queue(request)
        lease = queue.next(name)
        context = {
            "name": name,
            "lease": lease_json(lease) if lease else None,
            "stats": queue.stats(name),
            "lease_s": queue.settings.lease_s,
        }
        return templates.TemplateResponse(request, "label.html", context)


def _api(app: FastAPI) -> None:
    # Every status an API route can answer is declared, so clients (and the schema tests) know.
    read = error_responses(401, 503)
    write = error_responses(400, 401, 403, 409, 422, 503)

    @app.post("/api/next", tags=["labels"], responses=write)
    async def next_frame(name: Labeler, queue: Queue) -> dict[str, Any]:
        lease = queue.next(name)
        return {"lease": lease_json(lease) if lease else None, "stats": queue.stats(name)}

    @app.post("/api/answer", tags=["labels"], responses=write)
    async def answer(body: Answer, name: Labeler, queue: Queue, request: Request) -> dict[str, Any]:
        broker: BrokerWatch | None = getattr(request.state, "broker", None)
        if broker is not None and not broker.reachable:
            # At once, not after the producer's 40 s timeout; the lease stays, nothing is sent.
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"Kafka has been unreachable for {broker.down_for_s:.0f} s; the label was not "
                "sent: try again in a moment",
                headers={"Retry-After": "5"},
            )
        try:
            label = await queue.answer(body.lease_id, name, body.label, body.status)
        except LeaseError as error:
            raise HTTPException(
                status.HTTP_409_CONFLICT, "this lease is gone; take the next frame"
            ) from error
        except ValueError as error:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error)) from error
        except KafkaError as error:
            log.warning("label for lease %s not acknowledged: %r", body.lease_id, error)
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, "Kafka did not take the label; try again"
            ) from error
        return {"label": label.model_dump(mode="json"), "stats": queue.stats(name)}

    @app.post("/api/skip", tags=["labels"], responses=write)
    async def skip(body: LeaseRef, name: Labeler, queue: Queue) -> dict[str, Any]:
        try:
            queue.skip(body.lease_id, name)
        except LeaseError as error:
            raise HTTPException(status.HTTP_409_CONFLICT, "this lease is gone") from error
        return {"skipped": body.lease_id, "stats": queue.stats(name)}

    @app.post("/api/undo", tags=["labels"], responses=error_responses(401, 403, 404, 503))
    async def undo(name: Labeler, queue: Queue) -> dict[str, Any]:
        lease = queue.undo(name)
        if lease is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "nothing to undo")
        return {"lease": lease_json(lease), "stats": queue.stats(name)}

    @app.get("/api/stats", tags=["labels"], responses=read)
    async def stats(name: Labeler, queue: Queue) -> dict[str, Any]:
        return {"name": name, **queue.stats(name)}
