"""A scorer killed with SIGKILL mid-stream and restarted loses no frame."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kafka_helpers import produce, read_json

pytestmark = pytest.mark.slow


def _start_scorer(settings, model: Path, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "WINNOW_KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
        "WINNOW_KAFKA_TOPIC_PREFIX": settings.kafka.topic_prefix,
        "WINNOW_SCORER_GROUP_ID": settings.scorer.group_id,
        "WINNOW_SCORER_MAX_BATCH_SIZE": "8",
        "WINNOW_KAFKA_SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
        "WINNOW_KAFKA_HEARTBEAT_INTERVAL_MS": str(settings.kafka.heartbeat_interval_ms),
        "WINNOW_POLICY_NAME": "variable",
        "WINNOW_DEVICE": "cpu",
    }
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "winnow.cli", "serve", "--model", str(model), "--port", "0"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_sigkill_and_restart_loses_no_frame(
    scorer_settings, digits_model_path, digit_pngs, winnow_topics, tmp_path: Path
) -> None:
    settings = scorer_settings()
    total = 400
    frames = [
        (b"cam-%d" % (i % 4), digit_pngs[i % len(digit_pngs)], [("frame-id", f"f{i}".encode())])
        for i in range(total)
    ]
    log = tmp_path / "scorer.log"
    first = _start_scorer(settings, digits_model_path, log)
    try:
        await produce(settings.kafka, winnow_topics.frames, frames[:150])
        partial = await read_json(
            settings.kafka, winnow_topics.predictions, lambda out: len(out) >= 50, within=90
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert len(partial) >= 50
    await produce(settings.kafka, winnow_topics.frames, frames[150:])
    second = _start_scorer(settings, digits_model_path, log)
    try:
        predictions = await read_json(
            settings.kafka,
            winnow_topics.predictions,
            lambda out: len({p["frame_id"] for p in out}) >= total,
            within=120,
        )
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert {p["frame_id"] for p in predictions} == {f"f{i}" for i in range(total)}
