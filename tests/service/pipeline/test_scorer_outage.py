"""`winnow serve` rides out a broker outage (a fault proxy cuts it off) and stops cleanly in one."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.kafka.admin import ensure_winnow_topics
from service.pipeline.checkpoint import DRAIN_TIMEOUT_S
from tests.kafka_helpers import committed_offsets, end_offsets, produce, read_json
from tests.kafka_proxy import FaultProxy, free_port
from tests.outage_helpers import (
    MAX_LINES_PER_OUTAGE,
    OUTAGE_S,
    RoleLog,
    http_status,
    loud,
    until,
    watch_readiness,
)

pytestmark = pytest.mark.slow


SECOND_BURST = 8000


def _start(
    kafka, group: str, model: Path, port: int, log: Path, stall_timeout_s: float = 15
) -> subprocess.Popen:
    # The outage (30 s) is longer than the stall timeout: a watchdog that took it for a stall
    # would stop the scorer that has to ride it out.
    env = {
        **os.environ,
        "WINNOW_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "WINNOW_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "WINNOW_KAFKA_SESSION_TIMEOUT_MS": str(kafka.session_timeout_ms),
        "WINNOW_KAFKA_HEARTBEAT_INTERVAL_MS": str(kafka.heartbeat_interval_ms),
        "WINNOW_SCORER_GROUP_ID": group,
        "WINNOW_SCORER_MAX_BATCH_SIZE": "8",
        "WINNOW_POLICY_NAME": "variable",
        "WINNOW_DEVICE": "cpu",
        "WINNOW_SCORER_STALL_TIMEOUT_S": str(stall_timeout_s),
        # Frames in flight when the cut lands: Tansu ends a long poll only when its wait does,
        # so with the 500 ms default the scorer idles between fetches and may have delivered
        # and committed everything at the cut; these partitions stay far too small to starve.
        "WINNOW_SCORER_FETCH_MAX_WAIT_MS": "20",
    }
    command = [sys.executable, "-m", "winnow.cli", "serve", "--model", str(model)]
    with log.open("ab") as out:
        return subprocess.Popen(
            [*command, "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _frames(first: int, count: int, pngs: list[bytes]) -> list:
    return [
        (b"cam-%d" % (i % 4), pngs[i % len(pngs)], [("frame-id", f"f{i}".encode())])
        for i in range(first, first + count)
    ]


def _decided(predictions: list[dict]) -> set[str]:
    return {p["frame_id"] for p in predictions}


async def _committed_and_delivered(
    kafka, topics, group: str
) -> tuple[dict[int, int], set[tuple[int, int]]]:
    """The group's committed offset of each frames partition, and every (partition, offset)
    with a delivered decision."""
    committed = await committed_offsets(kafka, topics.frames, group)
    written = sum((await end_offsets(kafka, topics.predictions)).values())
    predictions = await read_json(kafka, topics.predictions, lambda out: len(out) >= written, 60)
    return committed, {(p["origin"]["partition"], p["origin"]["offset"]) for p in predictions}


async def _every_committed_frame_decided(kafka, topics, group: str) -> None:
    """No committed offset is ahead of a delivered decision (else that frame is lost)."""
    committed, delivered = await _committed_and_delivered(kafka, topics, group)
    for partition, offset in committed.items():
        missing = [o for o in range(offset) if (partition, o) not in delivered]
        assert not missing, f"partition {partition}: offsets {missing[:10]} committed, undecided"


@pytest.mark.parametrize("outage_s", [OUTAGE_S])
async def test_scorer_rides_out_an_outage_and_stops_cleanly_in_one(
    outage_s: float,
    fault_proxy: FaultProxy,
    proxied_kafka_settings,
    group_id,
    digits_model_path,
    digit_pngs,
    tmp_path: Path,
) -> None:
    """Catches: thousands of aiokafka ERROR lines during an outage, /readyz saying ready while
    the broker is gone (or not ready after it is back), a frame lost or an offset committed
    for an undelivered decision, a scorer that needs a restart after the outage, and a
    SIGTERM during an outage that hangs, exits non-zero, or ends in a traceback."""
    kafka = proxied_kafka_settings
    await ensure_winnow_topics(kafka)
    topics, port, log = kafka.topics, free_port(), RoleLog(tmp_path / "scorer.log")
    readyz = f"http://127.0.0.1:{port}/readyz"
    scorer = _start(kafka, group_id, digits_model_path, port, log.path)
    try:
        await produce(kafka, topics.frames, _frames(0, 200, digit_pngs))
        await read_json(kafka, topics.predictions, lambda out: len(_decided(out)) >= 200, 120)
        await until(lambda: http_status(readyz) == 200, 30)

        # Mid-stream: a burst is being scored when the broker goes.
        await produce(kafka, topics.frames, _frames(200, 600, digit_pngs))
        await read_json(kafka, topics.predictions, lambda out: len(_decided(out)) >= 230, 60)
        mark, cut_at = log.mark(), time.monotonic()
        fault_proxy.cut()
        seen = await watch_readiness(readyz, outage_s)
        fault_proxy.heal()
        healed_at = time.monotonic()
        back_after = await until(lambda: http_status(readyz) == 200, 90)
        assert 503 in seen, f"/readyz during the outage: {seen}"
        first_503 = seen.index(503)
        assert seen[first_503:].count(200) == 0, f"ready again while cut off: {seen}"
        decided = await read_json(
            kafka, topics.predictions, lambda out: len(_decided(out)) >= 800, 180
        )
        assert _decided(decided) == {f"f{i}" for i in range(800)}
        outage = loud(log.since(mark))
        print(
            f"scorer: {len(outage)} loud lines for a {healed_at - cut_at:.0f} s outage; "
            f"ready {back_after:.1f} s after the heal"
        )
        assert len(outage) <= MAX_LINES_PER_OUTAGE, "\n".join(outage)
        assert sum("unreachable since" in line for line in outage) == 1, "\n".join(outage)
        assert any("reachable again after" in line for line in outage), "\n".join(outage)
        await _every_committed_frame_decided(kafka, topics, group_id)

        # A stop during an outage, with frames in flight: enough of them that the scorer is
        # still at work when the cut lands (800 could all be decided and committed first).
        await produce(kafka, topics.frames, _frames(800, SECOND_BURST, digit_pngs))
        await read_json(kafka, topics.predictions, lambda out: len(_decided(out)) >= 830, 60)
        fault_proxy.cut()
        await until(lambda: http_status(readyz) == 503, 30)
        mark, stop_at = log.mark(), time.monotonic()
        scorer.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(scorer.wait, DRAIN_TIMEOUT_S + 30)
        stopped_in = time.monotonic() - stop_at
    finally:
        fault_proxy.heal()
        if scorer.poll() is None:
            scorer.kill()
            scorer.wait(30)
    print(f"scorer: stop during the outage took {stopped_in:.1f} s, exit code {code}")
    stop_lines = log.since(mark)
    text = "\n".join(stop_lines)
    assert code == 0, log.tail()
    assert stopped_in < DRAIN_TIMEOUT_S, text
    assert "Traceback" not in text and "shutdown failed" not in text, text
    # "the broker unreachable" when the commit failed, "records in flight" when what was
    # done had been committed before the cut but frames were still on their way
    said = [line for line in stop_lines if ": stopping with " in line]
    if said:
        assert len(said) == 1 and "decided again by the next owner" in said[0], text
    else:
        # The cut found the scorer between fetches with all it had fetched delivered and
        # committed (on the embedded broker it waits on fetches most of the time, the more
        # so as decoding got faster): nothing to say, so nothing delivered may lie past a
        # committed offset. (tests/infra/kafka/test_outage.py checks the lines themselves.)
        committed, delivered = await _committed_and_delivered(kafka, topics, group_id)
        ahead = [(p, o) for p, o in delivered if o >= committed.get(p, 0)]
        assert not ahead, f"decided but not committed, and no line said so: {ahead[:10]}\n{text}"
    assert len(loud(stop_lines)) <= 3, text

    # Nothing committed ahead of its decision; the next scorer decides every frame left.
    await _every_committed_frame_decided(kafka, topics, group_id)
    again = _start(kafka, group_id, digits_model_path, free_port(), log.path)
    try:
        decided = await read_json(
            kafka, topics.predictions, lambda out: len(_decided(out)) >= 800 + SECOND_BURST, 180
        )
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(60) == 0, log.tail()
    assert _decided(decided) == {f"f{i}" for i in range(800 + SECOND_BURST)}


STALL_TIMEOUT_S = 6


async def test_a_scorer_whose_connections_wedge_stops_and_its_successor_decides_every_frame(
    fault_proxy: FaultProxy,
    proxied_kafka_settings,
    group_id,
    digits_model_path,
    digit_pngs,
    tmp_path: Path,
) -> None:
    """Catches: a scorer that stops deciding while frames wait and stays up for good (the
    60-minute soak's stall at minute 33: ready, idle, lag growing, nothing logged), a stall
    that ends in a traceback or a zero exit (no orchestrator would restart it), and a frame
    committed but never decided across the stop and the restart."""
    kafka = proxied_kafka_settings
    await ensure_winnow_topics(kafka)
    topics, log = kafka.topics, RoleLog(tmp_path / "scorer.log")
    scorer = _start(
        kafka, group_id, digits_model_path, free_port(), log.path, stall_timeout_s=STALL_TIMEOUT_S
    )
    try:
        await produce(kafka, topics.frames, _frames(0, 200, digit_pngs))
        await read_json(kafka, topics.predictions, lambda out: len(_decided(out)) >= 200, 120)
        # Every connection the scorer holds stops getting answers; the broker still answers
        # new ones (the outage watch's probe, this test's producer).
        assert fault_proxy.freeze() > 0
        frozen_at = time.monotonic()
        await produce(kafka, topics.frames, _frames(200, 400, digit_pngs))
        code = await asyncio.to_thread(scorer.wait, 120)
        stopped_after = time.monotonic() - frozen_at
    finally:
        if scorer.poll() is None:
            scorer.kill()
            scorer.wait(30)
    text = "\n".join(log.lines())
    print(f"scorer: stopped {stopped_after:.1f} s after its connections froze, exit code {code}")
    assert code != 0, text
    stalled = [line for line in text.splitlines() if "scorer stalled" in line]
    assert len(stalled) == 1 and "none is lost" in stalled[0], text  # once, not per layer
    assert "Traceback" not in text, text

    await _every_committed_frame_decided(kafka, topics, group_id)
    again = _start(kafka, group_id, digits_model_path, free_port(), log.path)
    try:
        decided = await read_json(
            kafka, topics.predictions, lambda out: len(_decided(out)) >= 600, 180
        )
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(60) == 0, log.tail()
    assert _decided(decided) == {f"f{i}" for i in range(600)}
