"""Scale-out without loss: three scorer processes on a six-partition frames topic under
steady load; one is SIGKILLed and another added mid-stream, a release is published and the
stream shifts; every frame is decided, and releases and drift alarms keep flowing."""

import asyncio
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infra.kafka.admin import ensure_winnow_topics
from infra.kafka.settings import KafkaSettings
from tests.kafka_helpers import read_json
from tests.service.pipeline.scorer_group import (
    Replica,
    model_variant,
    partitions_even,
    produce_steadily,
    start_replica,
    wait_until,
)

pytestmark = pytest.mark.slow

PARTITIONS = 6
TOTAL = 1500
SHIFT_AT = 900  # frames from here on are inverted (a shift the drift monitors must see)
BUDGET = 0.1
WINDOW = 50


def _inverted(png: bytes) -> bytes:
    import io

    image = np.asarray(Image.open(io.BytesIO(png)))
    out = io.BytesIO()
    Image.fromarray((255 - image).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


async def test_a_replica_killed_and_one_added_mid_stream_lose_no_frame_and_keep_releases_and_alarms(
    kafka_settings: KafkaSettings,
    digits_model_path: Path,
    digit_pngs,
    publish_model,
    tmp_path: Path,
) -> None:
    """The failures it catches: frames of a killed replica's partitions never decided (offsets
    committed before their records were acknowledged, or partitions left unowned after the
    rebalance); requests without a frame id; a replica that joins late or survives a rebalance
    and misses a release published meanwhile, or stops feeding its drift monitor; a group
    that, across the rebalance, selects more than its budget allows (the bound of the README's
    Guarantees: b·N + k·floor(b·W) for k replica processes)."""
    kafka = kafka_settings.model_copy(update={"partitions": PARTITIONS})
    await ensure_winnow_topics(kafka)
    topics = kafka.topics
    group = f"g{uuid.uuid4().hex[:12]}"
    model = tmp_path / "model.onnx"
    model_variant(digits_model_path, model, "v-start", labels_trained=50)
    artifact, spec = model_variant(digits_model_path, tmp_path / "mid.onnx", "v-mid", 60)
    env = {
        "WINNOW_POLICY_NAME": "random",
        "WINNOW_POLICY_COLD_START": "none",
        "WINNOW_POLICY_BUDGET": str(BUDGET),
        "WINNOW_POLICY_WINDOW": str(WINDOW),
        "WINNOW_POLICY_BACKPRESSURE_WAITING": "0",
        "WINNOW_POLICY_BACKPRESSURE_WAIT_S": "0",
        "WINNOW_DRIFT_WARMUP_FRAMES": "100",
        "WINNOW_DRIFT_STATISTIC_EVERY": "50",
        "WINNOW_DRIFT_ERT": "500",
        "WINNOW_DRIFT_EMBEDDING_WINDOW": "16",
        "WINNOW_DRIFT_CLASS_WINDOW": "40",
        "WINNOW_DRIFT_PER_SOURCE": "false",
        "WINNOW_DRIFT_CALIBRATION_FRAMES": "20000",
        "WINNOW_DRIFT_BOOST_FACTOR": "1",  # the budget stays b, so the bound below is b's
    }
    replicas: list[Replica] = []

    def start(name: str) -> Replica:
        replica = start_replica(name, kafka, group, model, tmp_path, **env)
        replicas.append(replica)
        return replica

    inverted = [_inverted(png) for png in digit_pngs]
    frames = [
        (
            i % PARTITIONS,
            f"f{i}".encode(),
            (inverted if i >= SHIFT_AT else digit_pngs)[i % len(digit_pngs)],
        )
        for i in range(TOTAL)
    ]
    try:
        live = [start(f"scorer-{n}") for n in range(3)]
        await wait_until(
            lambda: partitions_even(live, PARTITIONS),
            180,
            "three replicas with two partitions each",
            live,
        )
        load = asyncio.create_task(produce_steadily(kafka, topics.frames, frames, per_second=40))
        await read_json(kafka, topics.predictions, lambda out: len(out) >= 250, within=120)
        live[0].kill()
        live = [live[1], live[2], start("scorer-3")]
        await publish_model(type("S", (), {"kafka": kafka})(), artifact, spec)
        await load
        predictions = await read_json(
            kafka,
            topics.predictions,
            lambda out: len({p["frame_id"] for p in out}) >= TOTAL,
            within=300,
        )
        await wait_until(
            lambda: all(
                (s := r.status()) is not None and s["model"]["version"] == "v-mid" for r in live
            ),
            120,
            "the release served by the survivors and the newcomer",
            live,
        )
        alarms = await read_json(
            kafka,
            topics.drift,
            lambda out: any(e["kind"] == "alarm" and e["model_version"] == "v-mid" for e in out),
            within=120,
        )
        requests = await read_json(
            kafka,
            topics.label_requests,
            lambda out: len(out) >= sum(p["decision"]["selected"] for p in predictions),
            within=60,
        )
    finally:
        codes = {replica.name: replica.stop() for replica in replicas}
    del codes["scorer-0"]  # killed
    assert all(code == 0 for code in codes.values()), {r.name: r.tail() for r in replicas}

    decided = {p["frame_id"] for p in predictions}
    assert decided == {f"f{i}" for i in range(TOTAL)}  # duplicates allowed, none lost
    assert all(r["frame_id"] and r["_key"] == r["frame_id"].encode() for r in requests)
    assert {r["frame_id"] for r in requests} <= decided
    processes = len(replicas)
    bound = BUDGET * len(predictions) + processes * int(BUDGET * WINDOW)
    selected = sum(p["decision"]["selected"] for p in predictions)
    kinds = sorted({(e["kind"], e["model_version"]) for e in alarms})
    print(
        f"{len(decided)} frames, {len(predictions)} decision records "
        f"({len(predictions) - len(decided)} duplicates), {selected} selected "
        f"({selected / len(predictions):.3f}; bound {bound:.0f} = b·N + {processes}·floor(b·W)), "
        f"{len(requests)} requests; drift events {kinds}"
    )
    assert selected <= bound
