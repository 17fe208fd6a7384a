"""Interop: a plain Kafka client (kcat, librdkafka) produces frames and reads decisions."""

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from service.model.inference import OnnxModel
from service.pipeline.scorer import Scorer

pytestmark = pytest.mark.kcat
KCAT = shutil.which("kcat")


@pytest.fixture(scope="module")
def kcat_env() -> dict[str, str]:
    """Debian's kcat with the current librdkafka that scripts/kcat uses (see winnow.kcat_compat)."""
    from winnow.kcat_compat import librdkafka_dir

    return {**os.environ, "LD_LIBRARY_PATH": str(librdkafka_dir())}


@pytest.mark.skipif(KCAT is None, reason="kcat is not installed (apt-get install kcat)")
async def test_kcat_frame_in_label_request_out(
    scorer_settings, digits_model_path, digit_pngs, winnow_topics, tmp_path: Path, kcat_env
) -> None:
    settings = scorer_settings(name="random", budget=1.0)
    bootstrap = settings.kafka.bootstrap
    frame = tmp_path / "frame.png"
    frame.write_bytes(digit_pngs[7])
    await asyncio.to_thread(
        subprocess.run,
        [
            KCAT,
            "-P",
            "-b",
            bootstrap,
            "-t",
            winnow_topics.frames,
            "-k",
            "kcat-cam",
            "-H",
            "frame-id=kcat-1",
            "-H",
            "content-type=image/png",
            str(frame),
        ],
        check=True,
        timeout=30,
        env=kcat_env,
    )
    async with Scorer(settings, OnnxModel.load(digits_model_path, device="cpu")):
        request = await asyncio.to_thread(
            _kcat_read_one, bootstrap, winnow_topics.label_requests, kcat_env
        )
        prediction = await asyncio.to_thread(
            _kcat_read_one, bootstrap, winnow_topics.predictions, kcat_env
        )
    key, value = request
    body = json.loads(value)
    assert key == "kcat-1" and body["frame_id"] == "kcat-1"
    assert body["source_id"] == "kcat-cam" and body["content_type"] == "image/png"
    assert prediction[0] == "kcat-cam" and json.loads(prediction[1])["frame_id"] == "kcat-1"


def _kcat_read_one(bootstrap: str, topic: str, env: dict[str, str]) -> tuple[str, str]:
    out = subprocess.run(
        [KCAT, "-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-c", "1", "-f", "%k\t%s\n"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    ).stdout
    key, _, value = out.rstrip("\n").partition("\t")
    return key, value
