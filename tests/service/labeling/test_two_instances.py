"""Two label-app processes sharing the queue (one consumer group): labelers on both, one
instance SIGKILLed and restarted mid-way; no frame lost, none leased to two labelers at once."""

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.deploy.prometheus_tools import free_port
from tests.kafka_helpers import read_json
from tests.service.labeling.conftest import CSRF, label_request, produce_requests

pytestmark = pytest.mark.slow

FRAMES = 60
LOOK_S = 0.15  # a labeler looks at the frame this long before answering


@dataclass
class Instance:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path


@dataclass
class Answer:
    frame_id: str
    labeler: str
    instance: str
    leased_after: float  # before the /api/next that granted the lease
    acked_at: float  # the 200 of /api/answer: the label is in Kafka


def _start(name: str, kafka, group: str, folder: Path) -> Instance:
    port = free_port()
    log = folder / f"{name}.log"
    env = {
        **os.environ,
        "WINNOW_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "WINNOW_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "WINNOW_KAFKA_SESSION_TIMEOUT_MS": str(kafka.session_timeout_ms),
        "WINNOW_KAFKA_HEARTBEAT_INTERVAL_MS": str(kafka.heartbeat_interval_ms),
        "WINNOW_LABEL_APP_GROUP_ID": group,
        "WINNOW_LABEL_APP_TEAM_TOKEN": "team-secret",
        "WINNOW_LABEL_APP_SESSION_SECRET": "shared-session-secret",
        "WINNOW_LABEL_APP_LEASE_S": "60",
        "WINNOW_LABEL_APP_COMMIT_INTERVAL_S": "0.2",
        "WINNOW_LABEL_APP_PORT": str(port),
    }
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "winnow.cli", "label-app"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Instance(name, process, f"http://127.0.0.1:{port}", log)


def _assigned(instance: Instance) -> set[int] | None:
    """The label-request partitions of its last assignment, from its log (None: none yet)."""
    lines = [
        line
        for line in instance.log.read_text(errors="replace").splitlines()
        if "label requests assigned" in line
    ]
    if not lines:
        return None
    listed = lines[-1].split("assigned:", 1)[1]
    return {int(part.split(":")[-1].strip(" '[]")) for part in listed.split(",") if ":" in part}


async def _wait_split(instances: list[Instance], partitions: int, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for instance in instances:
            assert instance.process.poll() is None, instance.log.read_text()[-2000:]
        owned = [_assigned(i) for i in instances]
        if all(owned) and sorted(p for o in owned for p in o or ()) == list(range(partitions)):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError({i.name: i.log.read_text()[-1500:] for i in instances})


async def _sign_in(url: str, name: str) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=url, timeout=10)
    response = await client.post("/login", data={"name": name, "token": "team-secret"})
    assert response.status_code in (200, 303), response.text
    return client


async def test_two_instances_lose_no_frame_and_never_lease_one_frame_twice_at_once(
    kafka_settings, winnow_topics, group_id, tmp_path: Path
) -> None:
    """The failures it catches: a frame two labelers label at the same time because two
    instances serve it together (both accepted), a frame leased at an instance that is killed
    and then never served again (lost), and answers acknowledged but not committed before a
    rebalance served again as if unanswered while still leased elsewhere."""
    partitions = kafka_settings.partitions
    requests = [label_request(f"q{i}", i % 10) for i in range(FRAMES)]
    for p in range(partitions):  # spread over every partition
        await produce_requests(kafka_settings, requests[p::partitions], partition=p)
    instances = {n: _start(n, kafka_settings, group_id, tmp_path) for n in ("a", "b")}
    answers: list[Answer] = []
    refused: list[str] = []
    labelers = {"ann": "a", "ben": "a", "cat": "b", "dan": "b"}  # who works on which instance
    third = asyncio.Event()  # a third of the frames answered: time to kill an instance

    async def work(name: str) -> None:
        client: httpx.AsyncClient | None = None
        at = ""
        while len({x.frame_id for x in answers}) < FRAMES:
            if at != labelers[name] or client is None:
                if client is not None:
                    await client.aclose()
                at = labelers[name]
                client = await _sign_in(instances[at].url, name)
            began = time.monotonic()
            try:
                response = await client.post("/api/next", headers=CSRF)
                lease = response.json()["lease"] if response.status_code == 200 else None
                if lease is None:
                    await asyncio.sleep(0.1)
                    continue
                await asyncio.sleep(LOOK_S)
                frame = lease["frame"]
                done = await client.post(
                    "/api/answer",
                    json={"lease_id": lease["lease_id"], "label": frame["classes"][0]},
                    headers=CSRF,
                )
            except httpx.TransportError:  # the instance is gone: the labeler goes to the other
                labelers[name] = "b" if at == "a" else "a"
                await asyncio.sleep(0.2)
                continue
            if done.status_code == 200:
                answers.append(Answer(frame["frame_id"], name, at, began, time.monotonic()))
                if len(answers) >= FRAMES // 3:
                    third.set()
            else:
                refused.append(frame["frame_id"])
        await client.aclose()

    try:
        await _wait_split(list(instances.values()), partitions, 60)
        tasks = [asyncio.create_task(work(name)) for name in labelers]
        async with asyncio.timeout(240):
            await third.wait()
            instances["a"].process.send_signal(signal.SIGKILL)  # mid-lease, no goodbye
            instances["a"].process.wait(timeout=30)
            instances["a"] = _start("a-again", kafka_settings, group_id, tmp_path)  # restarted
            await _wait_split([instances["a"], instances["b"]], partitions, 60)
            for name in ("ann", "ben"):  # back to their instance, as a balancer would send them
                labelers[name] = "a"
            await asyncio.gather(*tasks)
    finally:
        for instance in instances.values():
            if instance.process.poll() is None:
                instance.process.send_signal(signal.SIGTERM)
                instance.process.wait(timeout=30)
    labels = await read_json(
        kafka_settings, winnow_topics.labels, lambda out: len(out) >= len(answers), 60
    )
    assert {x["frame_id"] for x in labels} == {r.frame_id for r in requests}  # none lost
    by_frame: dict[str, list[Answer]] = {}
    for answer in answers:
        by_frame.setdefault(answer.frame_id, []).append(answer)
    for frame_id, held in by_frame.items():
        held.sort(key=lambda x: x.leased_after)
        for first, second in itertools.pairwise(held):
            assert first.acked_at <= second.leased_after, (
                f"{frame_id} leased to {first.labeler}@{first.instance} and "
                f"{second.labeler}@{second.instance} at once"
            )
    twice = sorted(f for f, held in by_frame.items() if len(held) > 1)
    print(
        f"{FRAMES} frames, {len(answers)} accepted answers, {len(labels)} labels, "
        f"{len(refused)} refused (lease gone), labeled twice (one after the other): {twice}"
    )
