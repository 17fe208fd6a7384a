"""The scorer's composition root: how a failure Kafka will not take back ends the scorer."""

import asyncio
import logging

import pytest
from aiokafka.errors import TopicAuthorizationFailedError

from infra.kafka.delivery import Delivery
from service.model.inference import OnnxModel
from service.runtime import run_scorer
from tests.kafka_helpers import committed_offsets, produce


async def test_a_fatal_kafka_refusal_fails_the_scorer_with_one_clear_line(
    scorer_settings,
    digits_model_path,
    digit_pngs,
    winnow_topics,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Catches a scorer that retries an authorization refusal forever (never restarted with
    the fixed ACLs), stays ready, commits what it could not deliver, or buries the cause in a
    traceback."""

    async def refused(self: Delivery, records: object) -> None:
        raise TopicAuthorizationFailedError("not allowed to write the predictions topic")

    monkeypatch.setattr(Delivery, "send", refused)
    settings = scorer_settings()
    failed = asyncio.Event()
    model = OnnxModel.load(digits_model_path, device="cpu")
    async with run_scorer(settings, model, on_failure=failed.set) as runtime:
        await produce(settings.kafka, winnow_topics.frames, [(b"cam", digit_pngs[0], [])])
        await asyncio.wait_for(failed.wait(), 60)
        assert not runtime.ready
    lines = [r for r in caplog.records if "no retry can fix" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert lines[0].levelno == logging.ERROR and lines[0].exc_info is None
    assert "TopicAuthorizationFailedError" in lines[0].getMessage()
    assert "/readyz now answers 503" in lines[0].getMessage()
    committed = await committed_offsets(
        settings.kafka, winnow_topics.frames, settings.scorer.group_id
    )
    assert set(committed.values()) == {0}, "nothing undelivered is committed"
