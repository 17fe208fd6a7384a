"""``winnow serve --workers 2`` end to end: a real broker, real worker processes, the digits
model. The two workers split the frames partitions and decide every frame once; one HTTP
endpoint answers for both (readiness, aggregated metrics, status, admin writes to both); a
release reaches both; a killed worker is restarted with the admin changes in force; SIGTERM
drains both and commits every decided frame. And ``--workers`` refuses a count below 1."""

import asyncio
import json
import os
import signal
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra.kafka.admin import ensure_winnow_topics
from infra.kafka.settings import KafkaSettings
from tests.kafka_helpers import committed_offsets, read_json
from tests.service.pipeline.scorer_group import (
    Replica,
    model_variant,
    produce_frames,
    start_replica,
    wait_until,
)
from winnow.cli import main

PARTITIONS = 4
FIRST = 240  # frames before the kill
SECOND = 80  # frames after it
TOKEN = "workers-test-admin-token-7c1f"


def http(replica: Replica, method: str, path: str, body: Any = None, token: str | None = None):
    """(status, JSON or text) of a request to the supervisor; (0, None) while it is not up."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{replica.port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            status, raw, kind = response.status, response.read(), response.headers["content-type"]
    except urllib.error.HTTPError as error:
        status, raw, kind = error.code, error.read(), error.headers["content-type"]
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None
    return status, json.loads(raw) if "json" in (kind or "") else raw.decode()


def ready(replica: Replica) -> bool:
    return http(replica, "GET", "/readyz")[0] == 200


def workers(replica: Replica) -> list[dict[str, Any]]:
    status, body = http(replica, "GET", "/v1/status")
    return body["workers"] if status == 200 else []


def metric_sum(text: str, name: str, **labels: str) -> dict[str, float]:
    """Values of ``name`` by worker, summed over the other labels, among samples with ``labels``."""
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                out[s.labels.get("worker", "")] += s.value
    return dict(out)


def frames(start: int, count: int, pngs: list[bytes]) -> list[tuple[int, bytes, bytes]]:
    return [
        (i % PARTITIONS, f"f{i}".encode(), pngs[i % len(pngs)]) for i in range(start, start + count)
    ]


@pytest.mark.slow
async def test_two_workers_share_the_group_one_endpoint_swaps_restarts_and_drain(
    kafka_settings: KafkaSettings,
    digits_model_path: Path,
    digit_pngs: list[bytes],
    publish_model,
    tmp_path: Path,
) -> None:
    """The failures it catches: workers that do not join one group (a frame decided twice, or
    a partition nobody holds); a /readyz that is ready with a worker down; /metrics from one
    worker only; a policy change, pin or release that reaches one worker; a killed worker
    left dead or brought back on the environment's policy and model; a SIGTERM that does not
    reach a worker (its frames uncommitted, or the supervisor hanging)."""
    kafka = kafka_settings.model_copy(update={"partitions": PARTITIONS, "session_timeout_ms": 6000})
    await ensure_winnow_topics(kafka)
    topics = kafka.topics
    model = tmp_path / "model.onnx"
    model_variant(digits_model_path, model, "v-start", labels_trained=50)
    artifact, spec = model_variant(digits_model_path, tmp_path / "next.onnx", "v-next", 60)
    group = f"g{uuid.uuid4().hex[:12]}"
    supervisor = start_replica(
        "supervisor",
        kafka,
        group,
        model,
        tmp_path,
        WINNOW_WORKERS="2",
        WINNOW_ADMIN_TOKEN=TOKEN,
        WINNOW_POLICY_NAME="random",
        WINNOW_POLICY_COLD_START="none",
        WINNOW_POLICY_BUDGET="0.1",
        WINNOW_DRIFT_ENABLED="false",
    )
    pids: list[int] = []
    try:
        await wait_until(lambda: ready(supervisor), 180, "both workers ready", [supervisor])
        _, readiness = http(supervisor, "GET", "/readyz")
        assert [w["ready"] for w in readiness["workers"]] == [True, True]
        assert readiness["partitions_assigned"] == PARTITIONS
        held = [{p for p in w["status"]["partitions"]} for w in workers(supervisor)]
        assert all(held) and not held[0] & held[1]  # each holds some, none holds one twice
        assert len(held[0] | held[1]) == PARTITIONS

        # Every frame decided exactly once: no loss, no duplicate, by two workers.
        await produce_frames(kafka, topics.frames, frames(0, FIRST, digit_pngs))
        decided = await read_json(
            kafka, topics.predictions, lambda out: len(out) >= FIRST, within=120
        )
        await asyncio.sleep(1)  # a duplicate would come right after
        decided = await read_json(kafka, topics.predictions, lambda out: len(out) >= FIRST)
        ids = Counter(p["frame_id"] for p in decided)
        assert set(ids) == {f"f{i}" for i in range(FIRST)} and max(ids.values()) == 1

        # One /metrics: both workers' series, whose sum is every frame.
        _, text = http(supervisor, "GET", "/metrics")
        by_worker = metric_sum(text, "winnow_frames_total")
        assert set(by_worker) == {"0", "1"} and all(v > 0 for v in by_worker.values())
        assert sum(by_worker.values()) == FIRST
        assert metric_sum(text, "winnow_worker_up") == {"0": 1, "1": 1}

        # Admin writes reach both workers, and only with the token.
        assert http(supervisor, "PUT", "/v1/policy", {"budget": 0.2})[0] == 401
        status, policies = http(supervisor, "PUT", "/v1/policy", {"budget": 0.2}, TOKEN)
        assert status == 200
        assert [w["policy"]["budget"] for w in policies["workers"]] == [0.2, 0.2]

        # A release reaches both workers.
        await publish_model(type("S", (), {"kafka": kafka})(), artifact, spec)
        await wait_until(
            lambda: (
                [w["status"] and w["status"]["model"]["version"] for w in workers(supervisor)]
                == ["v-next", "v-next"]
            ),
            120,
            "both workers serving the release",
            [supervisor],
        )
        _, text = http(supervisor, "GET", "/metrics")
        assert metric_sum(text, "winnow_model_info", version="v-next") == {"0": 1, "1": 1}
        status, models = http(supervisor, "POST", "/v1/model/pin", {"version": "v-next"}, TOKEN)
        assert status == 200
        assert [w["model"]["pinned"] for w in models["workers"]] == ["v-next", "v-next"]
        status, refused = http(supervisor, "POST", "/v1/model/pin", {"version": "v-x"}, TOKEN)
        assert status == 404 and "never seen" in refused["detail"]  # as the worker said it

        # A killed worker: unready meanwhile, restarted with the policy and the pin in force.
        killed = workers(supervisor)[1]["pid"]
        os.kill(killed, signal.SIGKILL)
        await wait_until(lambda: not ready(supervisor), 30, "unready with a worker dead")
        await wait_until(lambda: ready(supervisor), 180, "ready again", [supervisor])
        after = workers(supervisor)[1]
        assert after["restarts"] == 1 and after["pid"] != killed and after["last_exit"] == -9
        _, policies = http(supervisor, "GET", "/v1/policy")
        assert [w["policy"]["budget"] for w in policies["workers"]] == [0.2, 0.2]
        _, models = http(supervisor, "GET", "/v1/model")
        assert [w["model"]["pinned"] for w in models["workers"]] == ["v-next", "v-next"]
        assert after["status"]["model"]["version"] == "v-next"
        await produce_frames(kafka, topics.frames, frames(FIRST, SECOND, digit_pngs))
        decided = await read_json(
            kafka,
            topics.predictions,
            lambda out: len({p["frame_id"] for p in out}) >= FIRST + SECOND,
            within=120,
        )
        pids = [w["pid"] for w in workers(supervisor)]
    finally:
        code = supervisor.stop()  # SIGTERM
    assert code == 0, supervisor.tail()
    for pid in pids:  # both workers gone with it
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    log = supervisor.log.read_text()
    assert log.count("scorer stopped: counts=") >= 2  # each worker drained
    # Every decided frame's offset was committed by the drain of whichever worker held it.
    committed = await committed_offsets(kafka, topics.frames, group)
    per_partition = Counter(i % PARTITIONS for i in range(FIRST + SECOND))
    assert committed == dict(per_partition), supervisor.tail()


def test_a_worker_count_below_one_is_refused_with_a_clear_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--workers", "0"])
    assert exited.value.code == 2
    assert "--workers: expected a whole number of processes, 1 or more, not '0'" in (
        capsys.readouterr().err
    )
    monkeypatch.setenv("WINNOW_WORKERS", "-1")
    assert main(["serve", "--model", "missing.onnx"]) == 2
    assert "WINNOW_WORKERS: Input should be greater than or equal to 1" in capsys.readouterr().err
