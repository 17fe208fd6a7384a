"""Scorer replicas as real processes (``winnow serve``) in one consumer group, for the
multi-replica tests: start, ask their status, wait on their partitions, kill them."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from aiokafka import AIOKafkaProducer

from infra.kafka.connection import client_kwargs
from infra.kafka.settings import KafkaSettings
from schemas.model_spec import SPEC_KEY, ModelSpec
from tests.deploy.prometheus_tools import free_port


@dataclass
class Replica:
    """One ``winnow serve`` process and where it answers."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def status(self) -> dict[str, Any] | None:
        """Its ``/v1/status``, or None while it does not answer."""
        try:
            url = f"http://127.0.0.1:{self.port}/v1/status"
            with urllib.request.urlopen(url, timeout=2) as response:
                status: dict[str, Any] = json.load(response)
                return status
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def partitions(self) -> list[int] | None:
        """The frames partitions it owns now; None while it does not answer, or while its
        policy has not taken them yet (a scorer that shares the cap reads their history)."""
        status = self.status()
        if status is None:
            return None
        owned = sorted(int(tp.rsplit(":", 1)[1]) for tp in status["partitions"])
        taken = status["policy"].get("cap_partitions", owned)  # absent before the group cap
        return owned if sorted(taken) == owned else None

    def kill(self) -> None:
        """SIGKILL: no drain, no commit, no goodbye to the group."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        """SIGTERM, and its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
                return -9
        return self.process.returncode

    def tail(self, chars: int = 3000) -> str:
        """The end of its log, without the access lines of the tests' status polls."""
        lines = self.log.read_text(errors="replace").splitlines(keepends=True)
        return "".join(line for line in lines if '"GET /v1/status' not in line)[-chars:]


def start_replica(
    name: str, kafka: KafkaSettings, group: str, model: Path, folder: Path, **env: str
) -> Replica:
    """Starts ``winnow serve`` on a free port in ``group``; ``env`` adds ``WINNOW_*`` settings."""
    port = free_port()
    log = folder / f"{name}.log"
    environment = {
        **os.environ,
        "WINNOW_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "WINNOW_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "WINNOW_KAFKA_PARTITIONS": str(kafka.partitions),
        "WINNOW_KAFKA_SESSION_TIMEOUT_MS": str(kafka.session_timeout_ms),
        "WINNOW_KAFKA_HEARTBEAT_INTERVAL_MS": str(kafka.heartbeat_interval_ms),
        "WINNOW_SCORER_GROUP_ID": group,
        "WINNOW_SCORER_MAX_BATCH_SIZE": "8",
        "WINNOW_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
        **env,
    }
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "winnow.cli",
                "serve",
                "--model",
                str(model),
                "--port",
                f"{port}",
            ],
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Replica(name, process, port, log)


async def wait_until(
    check: Callable[[], bool], within: float, what: str, replicas: Iterable[Replica] = ()
) -> None:
    """Polls ``check`` (off the event loop) until it holds; fails saying ``what`` otherwise."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for replica in replicas:
            assert replica.process.poll() is None, f"{replica.name} exited:\n{replica.tail()}"
        if await asyncio.to_thread(check):
            return
        await asyncio.sleep(0.3)
    logs = "\n".join(f"--- {r.name}\n{r.tail(1500)}" for r in replicas)
    raise TimeoutError(f"{what}: not within {within:.0f} s\n{logs}")


def partitions_split(replicas: list[Replica], total: int) -> bool:
    """Whether the live replicas own every partition once and each owns some."""
    owned = [replica.partitions() for replica in replicas]
    if any(not parts for parts in owned):
        return False
    flat = sorted(p for parts in owned for p in parts or ())
    return flat == list(range(total))


def partitions_even(replicas: list[Replica], total: int) -> bool:
    """Whether the live replicas own every partition once, each as many as the others."""
    share = total // len(replicas)
    return partitions_split(replicas, total) and all(
        len(r.partitions() or ()) == share for r in replicas
    )


async def produce_frames(
    kafka: KafkaSettings, topic: str, frames: list[tuple[int, bytes, bytes]]
) -> None:
    """Produces (partition, frame id, image) to explicit partitions, so traffic is as set."""
    producer = AIOKafkaProducer(**client_kwargs(kafka), acks="all")
    await producer.start()
    try:
        for partition, frame_id, image in frames:
            await producer.send(
                topic,
                image,
                key=b"cam-%d" % partition,
                partition=partition,
                headers=[("frame-id", frame_id)],
            )
        await producer.flush()
    finally:
        await producer.stop()


async def produce_steadily(
    kafka: KafkaSettings,
    topic: str,
    frames: list[tuple[int, bytes, bytes]],
    per_second: float,
    chunk: int = 10,
) -> None:
    """Like :func:`produce_frames`, ``chunk`` frames at a time at about ``per_second``."""
    producer = AIOKafkaProducer(**client_kwargs(kafka), acks="all")
    await producer.start()
    try:
        for start in range(0, len(frames), chunk):
            began = time.monotonic()
            for partition, frame_id, image in frames[start : start + chunk]:
                await producer.send(
                    topic,
                    image,
                    key=b"cam-%d" % partition,
                    partition=partition,
                    headers=[("frame-id", frame_id)],
                )
            await producer.flush()
            await asyncio.sleep(max(0.0, chunk / per_second - (time.monotonic() - began)))
    finally:
        await producer.stop()


def model_variant(
    source: Path, out: Path, version: str, labels_trained: int
) -> tuple[bytes, ModelSpec]:
    """Writes a copy of an ONNX model whose spec says ``version`` and ``labels_trained``
    (a trained model: the drift monitor sits out an untrained one); returns its bytes and spec."""
    model = onnx.load(str(source))
    (prop,) = [p for p in model.metadata_props if p.key == SPEC_KEY]
    spec = ModelSpec.model_validate_json(prop.value).model_copy(
        update={"version": version, "labels_trained": labels_trained}
    )
    prop.value = spec.model_dump_json()
    data = model.SerializeToString()
    out.write_bytes(data)
    return data, spec
