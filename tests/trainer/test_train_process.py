"""`winnow train` as a process: SIGKILLed with labels in its store (before a round, and during
one), restarted, nothing lost."""

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kafka_helpers import read_json
from tests.trainer.helpers import DIGIT_CLASSES, feed, manifests
from trainer.store import SampleStore
from winnow.bench.soak.probe import descendants

pytestmark = pytest.mark.slow


def _start(
    kafka_settings, group_id: str, data_dir: Path, min_labels: int, log: Path, **settings: str
):
    env = {
        **os.environ,
        "WINNOW_KAFKA_BOOTSTRAP": kafka_settings.bootstrap,
        "WINNOW_KAFKA_TOPIC_PREFIX": kafka_settings.topic_prefix,
        "WINNOW_KAFKA_SESSION_TIMEOUT_MS": "2000",
        "WINNOW_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
        "WINNOW_TRAINER_GROUP_ID": group_id,
        "WINNOW_TRAINER_ROUND_MIN_LABELS": str(min_labels),
        "WINNOW_TRAINER_HOLDOUT_FRACTION": "0",
        **{f"WINNOW_TRAINER_{name.upper()}": value for name, value in settings.items()},
    }
    command = [
        sys.executable,
        "-m",
        "winnow.cli",
        "train",
        "--classes",
        ",".join(DIGIT_CLASSES),
        "--arch",
        "small-cnn",
        "--input-size",
        "16",
        "--channels",
        "1",
        "--device",
        "cpu",
        "--data-dir",
        str(data_dir),
        "--metrics-port",
        "0",
    ]
    with log.open("ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


async def test_sigkill_loses_no_label(
    kafka_settings,
    group_id,
    winnow_topics,
    digits,
    tmp_path: Path,
) -> None:
    pngs, targets = digits
    log, data_dir = tmp_path / "trainer.log", tmp_path / "data"
    first = _start(kafka_settings, group_id, data_dir, 10_000, log)
    try:
        await read_json(
            kafka_settings, winnow_topics.models, lambda out: len(manifests(out)) >= 1, within=60
        )  # the cold start
        await feed(kafka_settings, winnow_topics, pngs, targets, range(0, 30))
        async with asyncio.timeout(60):
            while True:  # the labels are in the store: the intake committed them
                store = SampleStore(data_dir / "samples.sqlite3")
                count = store.untrained_count()
                store.close()
                if count == 30:
                    break
                await asyncio.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    second = _start(kafka_settings, group_id, data_dir, 30, log)
    try:
        models = manifests(
            await read_json(
                kafka_settings,
                winnow_topics.models,
                lambda out: any(_full(m) and m["spec"]["labels_trained"] for m in manifests(out)),
                within=120,
            )
        )
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0, log.read_text()[-3000:]
    # Head-only releases (on by default) may come first; the backbone round learns all 30.
    trained = [m["spec"] for m in models if _full(m) and m["spec"]["labels_trained"]]
    assert trained[0]["labels_trained"] == 30
    assert len({m["version"] for m in models if not m["spec"]["labels_trained"]}) == 1


def _full(manifest: dict) -> bool:
    """A full release (backbone and head), not a head-only one."""
    return manifest.get("base_version") is None


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process and its children so far (Linux ``/proc``):
    a round trains in the trainer's round worker."""
    total = 0.0
    for each in (pid, *descendants(pid)):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is gone, waiting for init to reap it


async def test_sigkill_during_a_round_loses_no_label_and_the_next_release_learns_all(
    kafka_settings,
    group_id,
    winnow_topics,
    digits,
    tmp_path: Path,
) -> None:
    """The failures it catches: labels marked trained (or dropped) by a round that never
    finished, so a trainer killed mid-round and restarted never learns them; labels lost from
    the store by the kill; a round worker training on after its trainer was killed; a
    restarted trainer that publishes a release from fewer labels than it holds."""
    pngs, targets = digits
    log, data_dir = tmp_path / "trainer.log", tmp_path / "data"
    first = _start(kafka_settings, group_id, data_dir, 30, log, round_worker_rounds="20")
    try:
        await read_json(
            kafka_settings, winnow_topics.models, lambda out: len(manifests(out)) >= 1, within=60
        )  # the cold start
        await feed(kafka_settings, winnow_topics, pngs, targets, range(0, 30))
        async with asyncio.timeout(60):
            while True:  # the labels are in the store: a round on 30 labels starts now
                store = SampleStore(data_dir / "samples.sqlite3")
                count = store.untrained_count()
                store.close()
                if count == 30:
                    break
                await asyncio.sleep(0.1)
        busy_from = _cpu_seconds(first.pid)
        async with asyncio.timeout(60):
            while True:  # a second of CPU with nothing else to do: the round is training
                if _cpu_seconds(first.pid) - busy_from >= 1.0:
                    break
                await asyncio.sleep(0.05)
        workers = descendants(first.pid)
        assert workers, "the round trains in the trainer's round worker"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    async with asyncio.timeout(10):  # the round worker does not outlive its trainer
        while any(_alive(pid) for pid in workers):  # noqa: ASYNC110 (polling /proc)
            await asyncio.sleep(0.05)
    assert "round (trigger" not in log.read_text(), "the round ended before the kill"
    store = SampleStore(data_dir / "samples.sqlite3")
    try:
        counts = store.counts()
        assert (counts.labels, counts.labeled_frames, counts.trained) == (30, 30, 0)
        assert store.untrained_count() == 30  # every label stored, none marked trained
    finally:
        store.close()
    second = _start(kafka_settings, group_id, data_dir, 30, log)
    try:
        models = manifests(
            await read_json(
                kafka_settings,
                winnow_topics.models,
                lambda out: any(_full(m) and m["spec"]["labels_trained"] for m in manifests(out)),
                within=180,
            )
        )
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0, log.read_text()[-3000:]
    trained = [m["spec"] for m in models if _full(m) and m["spec"]["labels_trained"]]
    assert trained[0]["labels_trained"] == 30, "the next release learns from every label"
