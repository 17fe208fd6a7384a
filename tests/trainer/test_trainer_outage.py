"""`winnow train` rides out a broker outage (a fault proxy cuts it off) and stops cleanly in one."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kafka_helpers import committed_offsets, read_json
from tests.kafka_proxy import FaultProxy
from tests.outage_helpers import (
    MAX_LINES_PER_OUTAGE,
    OUTAGE_S,
    RoleLog,
    loud,
    record_keys,
    until,
)
from tests.trainer.helpers import DIGIT_CLASSES, feed, manifests
from trainer.config import TrainerSettings
from trainer.main import ensure_trainer_topics
from trainer.store import SampleStore

pytestmark = pytest.mark.slow

STOP_WITHIN_S = 30.0
"""A stop must end within a pod's usual grace period, broker or not."""


def _start(kafka, group_id: str, data_dir: Path, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "WINNOW_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "WINNOW_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "WINNOW_KAFKA_SESSION_TIMEOUT_MS": "2000",
        "WINNOW_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
        "WINNOW_TRAINER_GROUP_ID": group_id,
        "WINNOW_TRAINER_ROUND_MIN_LABELS": "10000",
        "WINNOW_TRAINER_HEAD_REFIT_LABELS": "0",
        "WINNOW_TRAINER_HOLDOUT_FRACTION": "0",
    }
    command = [sys.executable, "-m", "winnow.cli", "train", "--classes", ",".join(DIGIT_CLASSES)]
    command += ["--arch", "small-cnn", "--input-size", "16", "--channels", "1", "--device", "cpu"]
    command += ["--data-dir", str(data_dir), "--metrics-port", "0"]
    with log.open("ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stored(data_dir: Path) -> set[str]:
    store = SampleStore(data_dir / "samples.sqlite3")
    try:
        return {item.frame_id for item in store.trainable()}
    finally:
        store.close()


async def _every_committed_label_stored(kafka, group: str, data_dir: Path) -> None:
    """No committed offset is ahead of a label in the store (else that label is lost)."""
    committed = await committed_offsets(kafka, kafka.topics.labels, group)
    keys = await record_keys(kafka, kafka.topics.labels)
    stored = await asyncio.to_thread(_stored, data_dir)
    for partition, offset in committed.items():
        frames = [keys[(partition, o)].decode() for o in range(offset)]
        missing = [frame for frame in frames if frame not in stored]
        assert not missing, f"partition {partition}: labels {missing[:5]} committed, not stored"


@pytest.mark.parametrize("outage_s", [OUTAGE_S])
async def test_trainer_rides_out_an_outage_and_stops_cleanly_in_one(
    outage_s: float,
    fault_proxy: FaultProxy,
    proxied_kafka_settings,
    group_id,
    digits,
    tmp_path: Path,
) -> None:
    """Catches: a flood of aiokafka lines during an outage, a trainer that stops taking labels
    after it (or needs a restart), a label lost or committed before it is in the store, and
    a SIGTERM during an outage that hangs, exits non-zero or ends in a traceback."""
    kafka, (pngs, targets) = proxied_kafka_settings, digits
    await ensure_trainer_topics(TrainerSettings(kafka=kafka))
    log, data_dir = RoleLog(tmp_path / "trainer.log"), tmp_path / "data"
    trainer = _start(kafka, group_id, data_dir, log.path)
    try:
        await read_json(kafka, kafka.topics.models, lambda out: bool(manifests(out)), 90)
        await feed(kafka, kafka.topics, pngs, targets, range(0, 30))
        await until(lambda: len(_stored(data_dir)) == 30, 60)

        mark, cut_at = log.mark(), time.monotonic()
        await feed(kafka, kafka.topics, pngs, targets, range(30, 60))  # mid-intake
        fault_proxy.cut()
        await until(lambda: any("unreachable since" in x for x in log.since(mark)), 20)
        await asyncio.sleep(max(0.0, outage_s - (time.monotonic() - cut_at)))
        fault_proxy.heal()
        healed_at = time.monotonic()
        await feed(kafka, kafka.topics, pngs, targets, range(60, 90))
        back_after = await until(lambda: len(_stored(data_dir)) == 90, 90)
        # The broker watch says so on its next probe, which may come after the labels are in.
        await until(lambda: any("reachable again after" in x for x in log.since(mark)), 20)
        outage = loud(log.since(mark))
        print(
            f"trainer: {len(outage)} loud lines for a {healed_at - cut_at:.0f} s outage; "
            f"labels fed after the heal stored {back_after:.1f} s later"
        )
        assert len(outage) <= MAX_LINES_PER_OUTAGE, "\n".join(outage)
        assert sum("unreachable since" in line for line in outage) == 1, "\n".join(outage)
        assert any("reachable again after" in line for line in outage), "\n".join(outage)
        assert _stored(data_dir) == {f"f{i}" for i in range(90)}
        await _every_committed_label_stored(kafka, group_id, data_dir)

        # A stop during an outage.
        await feed(kafka, kafka.topics, pngs, targets, range(90, 100))
        mark = log.mark()
        fault_proxy.cut()
        await until(lambda: any("unreachable since" in x for x in log.since(mark)), 20)
        mark, stop_at = log.mark(), time.monotonic()
        trainer.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(trainer.wait, STOP_WITHIN_S + 30)
        stopped_in = time.monotonic() - stop_at
    finally:
        fault_proxy.heal()
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(30)
    print(f"trainer: stop during the outage took {stopped_in:.1f} s, exit code {code}")
    stop_lines = log.since(mark)
    text = "\n".join(stop_lines)
    assert code == 0, log.tail()
    assert stopped_in < STOP_WITHIN_S, text
    assert "Traceback" not in text and "ERROR" not in text, text
    assert len(loud(stop_lines)) <= 3, text
    for line in stop_lines:  # when a batch was in hand, its partitions are named
        if "stopping with the broker unreachable" in line:
            assert "read again" in line, text
    await _every_committed_label_stored(kafka, group_id, data_dir)
