"""The label app's readiness, and how a failure Kafka will not take back ends it."""

import logging
import threading
import time

import pytest
from aiokafka.errors import GroupAuthorizationFailedError
from fastapi.testclient import TestClient

from service.labeling.app import create_label_app
from service.labeling.queue import LabelQueue


def _ready(client: TestClient, within: float = 30) -> dict:
    deadline = time.monotonic() + within
    while True:
        response = client.get("/readyz")
        if response.status_code == 200 or time.monotonic() > deadline:
            return {"status": response.status_code, **response.json()}
        time.sleep(0.1)


def test_readyz_once_the_queue_serves(kafka_settings, winnow_topics, app_settings) -> None:
    """Catches a readiness endpoint that is missing, or never ready on a healthy broker."""
    client = TestClient(create_label_app(kafka_settings, app_settings()))
    assert client.get("/readyz").status_code == 503  # no lifespan yet: nothing runs
    with client:
        ready = _ready(client)
    assert ready["status"] == 200 and ready["broker_reachable"] and ready["partitions_assigned"]


def test_a_fatal_kafka_refusal_fails_the_label_app_with_one_clear_line(
    kafka_settings,
    winnow_topics,
    app_settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Catches a label app that keeps serving (ready, or silently empty) after Kafka refused
    its consumer group, so the orchestrator never restarts it with the fixed ACLs."""

    def refused(self: LabelQueue, consumer: object) -> None:
        raise GroupAuthorizationFailedError("group winnow-label-app")

    monkeypatch.setattr(LabelQueue, "_flow_control", refused)
    failed = threading.Event()
    app = create_label_app(kafka_settings, app_settings(), on_failure=failed.set)
    with TestClient(app) as client:
        assert failed.wait(30), "on_failure was not called"
        assert client.get("/readyz").status_code == 503
    lines = [r for r in caplog.records if "no retry can fix" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR and lines[0].exc_info is None
    assert lines[0].getMessage().startswith("label-app: Kafka refused")
