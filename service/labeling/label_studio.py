"""``winnow label-studio-bridge``: label requests into Label Studio, annotations back to Kafka.

Out: label requests are read from ``winnow.label-requests`` (consumer group
``WINNOW_LABEL_STUDIO_GROUP_ID``) and imported as tasks with
``POST /api/projects/{id}/import?return_task_ids=true`` (a JSON list of tasks,
authenticated with a personal access token or a legacy token, see
:mod:`service.labeling.label_studio_auth`). Each task's ``data``
holds the image as a data URL under ``WINNOW_LABEL_STUDIO_IMAGE_KEY``, the
frame id, source and capture time, and the model's uncertainty values (so the
Data Manager can sort by them); the model's prediction comes as a
pre-annotation in ``predictions``. A batch's offsets are done once Label
Studio answered its import with 201 (an unreadable request is done at once), and
the committed offset is the done prefix
(:class:`~infra.kafka.offsets.OffsetTracker`): stopping in the middle of an
import, or losing a partition to a rebalance, re-imports that batch rather than
skipping it.

In: Label Studio's webhook (``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED``,
configured to send the header ``Authorization: Token <webhook token>``) posts
``{"action", "annotation": {...}, "task": {...}, "project": {...}}``. The
bridge publishes a :class:`~schemas.labels.Label`: the frame id from the task's
data, the class from the ``choices`` result of ``WINNOW_LABEL_STUDIO_FROM_NAME``,
the annotator from ``completed_by``. Deliveries are deduplicated by annotation
id and ``updated_at``.

A matching labeling config::

    <View>
      <Image name="image" value="$image" zoom="true"/>
      <Choices name="choice" toName="image" choice="single">
        <Choice value="normal"/><Choice value="polyp"/><Choice value="unlabelable"/>
      </Choices>
    </View>
"""

import asyncio
import base64
import hmac
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypedDict

import httpx
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from fastapi import FastAPI, HTTPException, Request, status
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.component import Component
from infra.kafka import create_consumer, create_producer
from infra.kafka.admin import ensure_topics
from infra.kafka.offsets import OffsetTracker
from infra.kafka.settings import KafkaSettings
from schemas.frames import CONTENT_TYPES
from schemas.label_requests import LabelRequest
from schemas.labels import Label
from service.labeling.label_studio_auth import (
    TOKEN_SETTING,
    AuthScheme,
    LabelStudioAuthError,
    create_auth,
)

log = logging.getLogger(__name__)

ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")


class LabelStudioSettings(BaseSettings):
    """Where Label Studio is and how its project is set up."""

    model_config = SettingsConfigDict(
        env_prefix="WINNOW_LABEL_STUDIO_", extra="ignore", frozen=True
    )

    url: str = Field(default="http://127.0.0.1:8080", description="Label Studio's base URL")
    api_key: SecretStr | None = Field(
        default=None,
        description="a personal access token (a JWT; Account & Settings, Personal Access Token) "
        "or a legacy token",
    )
    auth_scheme: AuthScheme = Field(
        default="auto",
        description="'personal' (Bearer access tokens traded for the personal access token), "
        "'legacy' (Authorization: Token), or 'auto': a JWT is a personal access token",
    )
    project_id: int = Field(default=1, ge=1)
    webhook_token: SecretStr | None = Field(
        default=None, description="the webhook must send 'Authorization: Token <this>'"
    )
    image_key: str = Field(default="image", description="the $variable of the Image tag")
    from_name: str = Field(default="choice", description="name of the Choices tag")
    to_name: str = Field(default="image", description="toName of the Choices tag")
    unlabelable_choice: str = Field(default="unlabelable", description="the 'can't tell' choice")
    group_id: str = "winnow-label-studio"
    batch_size: int = Field(default=50, ge=1, le=10_000)
    timeout_s: float = Field(default=30.0, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(default=8200, ge=0, le=65535)


# -- mapping --------------------------------------------------------------------------
def task_from_request(request: LabelRequest, settings: LabelStudioSettings) -> dict[str, Any]:
    """A Label Studio task (JSON import format) for one label request."""
    content_type = request.content_type if request.content_type in CONTENT_TYPES else "image/png"
    image = f"data:{content_type};base64,{base64.b64encode(request.image).decode()}"
    return {
        "data": {
            settings.image_key: image,
            "frame_id": request.frame_id,
            "source_id": request.source_id,
            "captured_at": request.captured_at.isoformat() if request.captured_at else None,
            "model_version": request.model_version,
            "prediction": request.label,
            "confidence": request.confidence,
            "reason": request.decision.reason,
            "utility": request.decision.utility,
            "least_confidence": request.scores.least_confidence,
            "margin": request.scores.margin,
            "entropy": request.scores.entropy,
        },
        "predictions": [
            {
                "model_version": request.model_version,
                "score": request.confidence,
                "result": [
                    {
                        "from_name": settings.from_name,
                        "to_name": settings.to_name,
                        "type": "choices",
                        "value": {"choices": [request.label]},
                    }
                ],
            }
        ],
    }


class WebhookError(ValueError):
    """A webhook body the bridge cannot turn into a label."""


def label_from_webhook(
    payload: dict[str, Any], settings: LabelStudioSettings, task_frames: dict[int, str]
) -> Label | None:
    """The label an annotation webhook carries; None for events that carry none.

    Args:
        payload: the webhook's JSON body.
        settings: the Choices tag's name and the 'can't tell' choice.
        task_frames: frame ids of imported task ids, used when the body has no task object.

    Raises:
        WebhookError: the annotation has no frame id or no choice.
    """
    if payload.get("action") not in ANNOTATION_ACTIONS:
        return None
    annotation = payload.get("annotation")
    if not isinstance(annotation, dict):
        raise WebhookError("no annotation object")
    if annotation.get("was_cancelled"):
        return None  # a skipped task: no answer
    frame_id = _frame_id(payload.get("task"), annotation, task_frames)
    choices = [
        choice
        for result in annotation.get("result") or ()
        if isinstance(result, dict)
        and result.get("type") == "choices"
        and result.get("from_name") == settings.from_name
        for choice in (result.get("value") or {}).get("choices") or ()
    ]
    if not choices:
        raise WebhookError(f"no {settings.from_name!r} choice in annotation {annotation.get('id')}")
    unlabelable = choices[0] == settings.unlabelable_choice
    return Label(
        frame_id=frame_id,
        label=None if unlabelable else str(choices[0]),
        status="unlabelable" if unlabelable else "labeled",
        annotator=_annotator(annotation.get("completed_by")),
        labeled_at=_time(annotation.get("updated_at") or annotation.get("created_at")),
    )


def dedup_key(payload: dict[str, Any]) -> str | None:
    annotation = payload.get("annotation") or {}
    if not isinstance(annotation, dict) or annotation.get("id") is None:
        return None
    return f"{annotation['id']}@{annotation.get('updated_at') or annotation.get('created_at')}"


def _frame_id(task: Any, annotation: dict[str, Any], task_frames: dict[int, str]) -> str:
    if isinstance(task, dict) and isinstance(task.get("data"), dict):
        frame_id = task["data"].get("frame_id")
        if frame_id:
            return str(frame_id)
    task_id = task.get("id") if isinstance(task, dict) else annotation.get("task")
    if isinstance(task_id, int) and task_id in task_frames:
        return task_frames[task_id]
    raise WebhookError(f"no frame_id in the task data of task {task_id}")


def _annotator(completed_by: Any) -> str | None:
    if isinstance(completed_by, dict):
        who = completed_by.get("email") or completed_by.get("username") or completed_by.get("id")
        return None if who is None else f"label-studio:{who}"
    return None if completed_by is None else f"label-studio:user-{completed_by}"


def _time(text: Any) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return datetime.now(UTC)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# -- the client -------------------------------------------------------------------------
class LabelStudioClient:
    """The one Label Studio call the bridge makes: importing tasks."""

    def __init__(
        self, settings: LabelStudioSettings, transport: httpx.AsyncBaseTransport | None = None
    ):
        if settings.api_key is None:
            raise ValueError(
                f"set {TOKEN_SETTING} (a Label Studio personal access token: "
                "Account & Settings, Personal Access Token)"
            )
        self.settings = settings
        base_url = settings.url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=base_url,
            auth=create_auth(settings.api_key.get_secret_value(), settings.auth_scheme, base_url),
            timeout=settings.timeout_s,
            transport=transport,
        )

    async def import_tasks(self, tasks: list[dict[str, Any]]) -> list[int]:
        """Imports tasks; returns their Label Studio ids.

        Raises:
            LabelStudioAuthError: Label Studio refused the token, or its user the project.
            httpx.HTTPError: Label Studio failed or could not be reached.
        """
        project = self.settings.project_id
        response = await self._http.post(
            f"/api/projects/{project}/import", params={"return_task_ids": "true"}, json=tasks
        )
        if response.status_code in (403, 404):
            raise LabelStudioAuthError(
                f"Label Studio answered {response.status_code} to an import into project "
                f"{project}: check WINNOW_LABEL_STUDIO_PROJECT_ID, and that the user of "
                f"{TOKEN_SETTING} is a member of that project"
            )
        response.raise_for_status()
        body = response.json()
        ids = [int(i) for i in body.get("task_ids") or ()]
        sent = sum(len(task.get("predictions", ())) for task in tasks)
        if sent and body.get("prediction_count") == 0 and len(ids) == len(tasks):
            await self._import_predictions(ids, tasks)
        return ids

    async def _import_predictions(self, ids: list[int], tasks: list[dict[str, Any]]) -> None:
        """Sends the pre-annotations of imported tasks again, through the predictions API.

        Label Studio (1.23) retries an import's write when SQLite is locked by another
        request, and the retry runs on task dicts the first attempt already took the
        predictions out of: the tasks are stored, their pre-annotations are not
        (``prediction_count`` 0). A task is useful without its pre-annotation, so a failure
        here is logged and the import stands (importing again would duplicate the tasks).
        """
        project = self.settings.project_id
        items = [
            {"task": task_id, **prediction}
            for task_id, task in zip(ids, tasks, strict=True)
            for prediction in task.get("predictions", ())
        ]
        try:
            response = await self._http.post(
                f"/api/projects/{project}/import/predictions", json=items
            )
            response.raise_for_status()
        except httpx.HTTPError as error:
            log.warning(
                "Label Studio stored %d tasks without their pre-annotations and refused them "
                "again (%r); the tasks are there, unannotated",
                len(ids), error,
            )  # fmt: skip
            return
        log.warning(
            "Label Studio stored %d tasks without their pre-annotations (it drops them when it "
            "retries a write on a busy database); sent again: %s created",
            len(ids), response.json().get("created"),
        )  # fmt: skip

    async def aclose(self) -> None:
        await self._http.aclose()


# -- the bridge -------------------------------------------------------------------------
class Bridge(Component):
    """Imports label requests into Label Studio and publishes webhook annotations as labels.

    Use as ``async with Bridge(kafka, settings, client) as bridge``; ``stop()``
    commits the imported prefix, closes the Kafka clients and ``client``.
    """

    def __init__(
        self, kafka: KafkaSettings, settings: LabelStudioSettings, client: LabelStudioClient
    ) -> None:
        super().__init__()
        self.kafka, self.settings, self.client = kafka, settings, client
        self.task_frames: dict[int, str] = {}
        self.offsets = OffsetTracker("label-studio-bridge")
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self.imported = 0

    async def _start(self) -> None:
        """Starts the producer (webhook labels), then the consumer and the import loop."""
        self._producer = create_producer(self.kafka)
        await self._producer.start()
        self._consumer = create_consumer(self.kafka, group_id=self.settings.group_id)
        self._consumer.subscribe([self.kafka.topics.label_requests], listener=_Revoke(self))
        await self._consumer.start()
        self.supervise(self._run(), name="label-studio-import")

    async def _stop(self) -> None:
        """Stops the import loop, commits the imported prefix, closes every client."""
        # An import cut short is not done: its batch is read again, not skipped.
        await self._cancel_supervised()
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        if consumer is not None:
            await self.offsets.commit(consumer)  # a failed commit is logged, not raised
        for kafka_client in (consumer, producer):
            if kafka_client is not None:
                await kafka_client.stop()
        await self.client.aclose()

    async def publish(self, payload: dict[str, Any]) -> Label | None:
        """Publishes the label of a webhook body once per annotation version.

        Raises:
            WebhookError: as :func:`label_from_webhook`.
        """
        key = dedup_key(payload)
        if key is not None and key in self._seen:
            return None
        label = label_from_webhook(payload, self.settings, self.task_frames)
        if label is None:
            return None
        assert self._producer is not None, "the bridge is not started"
        await self._producer.send_and_wait(
            self.kafka.topics.labels,
            label.model_dump_json(exclude_none=True).encode(),
            key=label.frame_id.encode(),
        )
        if key is not None:
            self._seen[key] = None
            while len(self._seen) > 100_000:
                self._seen.popitem(last=False)
        return label

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            batches = await consumer.getmany(timeout_ms=500, max_records=self.settings.batch_size)
            records = [r for rs in batches.values() for r in rs]
            if not records:
                continue
            positions = [(TopicPartition(r.topic, r.partition), r.offset) for r in records]
            self.offsets.consumed_many(positions)
            await self._import(records)
            self.offsets.done_many(positions)
            await self.offsets.commit(consumer)  # a failure is logged; the next batch retries it

    async def _import(self, records: list[ConsumerRecord]) -> None:
        """Imports a batch, retrying until Label Studio takes it; skips unreadable requests."""
        tasks, frame_ids = [], []
        for record in records:
            try:
                request = LabelRequest.model_validate_json(record.value or b"")
            except ValidationError:
                log.error(
                    "unreadable label request topic=%s partition=%s offset=%s",
                    record.topic, record.partition, record.offset,
                )  # fmt: skip
                continue
            tasks.append(task_from_request(request, self.settings))
            frame_ids.append(request.frame_id)
        if not tasks:
            return
        delay = 0.5
        while True:
            try:
                ids = await self.client.import_tasks(tasks)
                break
            except LabelStudioAuthError as error:
                # Someone has to fix a setting or Label Studio; keep trying, slowly and loudly.
                delay = 30.0
                log.error("Label Studio import refused: %s; retrying in %.0fs", error, delay)
            except httpx.HTTPError as error:
                log.warning("Label Studio import failed (%r); retrying in %.1fs", error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        self.task_frames.update(zip(ids, frame_ids, strict=False))
        self.imported += len(tasks)


class _Revoke(ConsumerRebalanceListener):
    """Commits the imported prefix before partitions move; forgets the ones it lost.

    A batch is imported and committed before the next fetch, so this commit
    only matters when the last one failed.
    """

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        consumer = self.bridge._consumer
        if consumer is not None and revoked:
            await self.bridge.offsets.commit(consumer)
        self.bridge.offsets.forget(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info(
            "label requests assigned to the bridge: %s",
            sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
        )


class BridgeState(TypedDict):
    """The lifespan state of the bridge's app (``request.state.bridge``)."""

    bridge: Bridge


def create_bridge_app(
    kafka: KafkaSettings,
    settings: LabelStudioSettings,
    transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """The bridge's HTTP side: ``POST /webhook`` for Label Studio, ``/healthz``."""
    if settings.webhook_token is None or not settings.webhook_token.get_secret_value().strip():
        # An empty token would let any "Authorization: Token " header through.
        raise ValueError("set WINNOW_LABEL_STUDIO_WEBHOOK_TOKEN: webhooks must authenticate")
    client = LabelStudioClient(settings, transport)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[BridgeState]:
        await ensure_topics(kafka, [kafka.topics.label_requests, kafka.topics.labels])
        async with Bridge(kafka, settings, client) as bridge:
            yield {"bridge": bridge}

    app = FastAPI(title="Winnow Label Studio bridge", version="0.1.0", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        bridge: Bridge | None = getattr(request.state, "bridge", None)
        return {"status": "ok", "imported": bridge.imported if bridge else 0}

    @app.post("/webhook")
    async def webhook(request: Request) -> dict[str, Any]:
        expected = f"Token {settings.webhook_token.get_secret_value()}"  # type: ignore[union-attr]
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "bad webhook token")
        try:
            payload = await request.json()
        except ValueError as error:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "not JSON") from error
        if not isinstance(payload, dict):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "not a JSON object")
        try:
            bridge: Bridge = request.state.bridge
            label = await bridge.publish(payload)
        except (WebhookError, ValidationError) as error:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error)) from error
        return {"published": label.model_dump(mode="json") if label else None}

    return app
