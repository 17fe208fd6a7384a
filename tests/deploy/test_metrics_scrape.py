"""Real scrapes of ``winnow serve --workers 2``, ``winnow train`` and ``winnow label-app``,
started as processes on the suite's broker: ``promtool check metrics`` passes on each, and
together they expose every metric the dashboard and the alert rules read."""

import io
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.prometheus_tools import (
    ROOT,
    dashboard_queries,
    dashboards,
    exposed_names,
    free_port,
    metric_names,
    promtool,
    rule_groups,
    stop,
    wait_for,
)
from tests.kafka_helpers import Record, produce

pytestmark = pytest.mark.slow

FRAMES = 30


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, format="PNG")
    return out.getvalue()


def scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text: str = response.read().decode()
        return text


@pytest.fixture
def roles(kafka_settings, winnow_topics, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The three roles as `winnow` processes; their metrics URLs once each answers."""
    tag = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "WINNOW_KAFKA_BOOTSTRAP": kafka_settings.bootstrap,
        "WINNOW_KAFKA_TOPIC_PREFIX": kafka_settings.topic_prefix,
        "WINNOW_KAFKA_SESSION_TIMEOUT_MS": "2000",
        "WINNOW_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
        "WINNOW_SCORER_GROUP_ID": f"scorer-{tag}",
        "WINNOW_TRAINER_GROUP_ID": f"trainer-{tag}",
        "WINNOW_LABEL_APP_GROUP_ID": f"label-app-{tag}",
        "WINNOW_LABEL_APP_TEAM_TOKEN": "team-token",
    }
    ports = {"trainer": free_port(), "scorer": free_port(), "label-app": free_port()}
    classes = ",".join(str(d) for d in range(10))
    commands = {
        "trainer": ["train", "--classes", classes, "--arch", "small-cnn", "--input-size", "16",
                    "--channels", "1", "--device", "cpu", "--data-dir", str(tmp_path / "data"),
                    "--metrics-port", str(ports["trainer"])],
        # two workers: the supervisor's merged scrape holds the scorer's metrics (per worker)
        # and its own (winnow_worker_up, winnow_worker_restarts_total)
        "scorer": ["serve", "--device", "cpu", "--port", str(ports["scorer"]), "--workers", "2"],
        "label-app": ["label-app", "--port", str(ports["label-app"])],
    }  # fmt: skip
    processes: dict[str, subprocess.Popen[bytes]] = {}
    logs = {role: (tmp_path / f"{role}.log").open("wb") for role in commands}
    try:
        for role, args in commands.items():  # the trainer first: the scorer serves its release
            processes[role] = subprocess.Popen(
                [sys.executable, "-m", "winnow.cli", *args],
                cwd=ROOT, env=env, stdout=logs[role], stderr=subprocess.STDOUT,
            )  # fmt: skip
        urls = {role: f"http://127.0.0.1:{port}" for role, port in ports.items()}
        # the supervisor answers /metrics before its workers run; its /readyz only once
        # every worker is up (otherwise one worker may decide every frame while the other
        # is still joining, and the scrape lacks its series)
        ready = {"trainer": "/metrics", "scorer": "/readyz", "label-app": "/metrics"}
        for role, url in urls.items():
            try:
                wait_for(f"{url}{ready[role]}", processes[role], 180)
            except (TimeoutError, AssertionError) as error:
                output = (tmp_path / f"{role}.log").read_text()[-3000:]
                raise AssertionError(f"{role} did not serve metrics: {error}\n{output}") from error
        yield urls
    finally:
        for process in processes.values():
            stop(process)
        for log in logs.values():
            log.close()


def _frames_decided(url: str) -> float:
    families = text_string_to_metric_families(scrape(url))
    return sum(
        sample.value
        for family in families
        if family.name == "winnow_frames"
        for sample in family.samples
        if sample.name == "winnow_frames_total"
    )


async def test_real_scrapes_pass_promtool_and_hold_every_queried_metric(
    roles: dict[str, str], kafka_settings, winnow_topics
) -> None:
    records: list[Record] = [(b"camera-0", _png(i), []) for i in range(FRAMES)]
    await produce(kafka_settings, winnow_topics.frames, records)
    deadline = time.monotonic() + 90
    while _frames_decided(roles["scorer"]) < FRAMES and time.monotonic() < deadline:
        time.sleep(0.5)  # noqa: ASYNC251 - the processes run on their own
    assert _frames_decided(roles["scorer"]) >= FRAMES

    exposed: set[str] = {"up"}  # Prometheus's own, per target
    for role, url in roles.items():
        text = scrape(url)
        linted = promtool("check", "metrics", input_text=text)
        assert linted.returncode == 0 and not linted.stdout.strip(), (role, linted)
        exposed |= exposed_names(text_string_to_metric_families(text))

    for name, dashboard in dashboards().items():
        for where, expr in dashboard_queries(dashboard):
            missing = metric_names(expr) - exposed
            assert not missing, f"{name} {where} reads metrics no role exposes: {missing}"
    for group in rule_groups():
        for rule in group["rules"]:
            missing = metric_names(rule["expr"]) - exposed
            assert not missing, (
                f"alert {rule.get('alert')} reads metrics no role exposes: {missing}"
            )

    scorer = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(scrape(roles["scorer"]))
        for sample in family.samples
    }
    for worker in ("0", "1"):
        provider = (("provider", "CPUExecutionProvider"), ("worker", worker))
        assert scorer[("winnow_inference_provider", provider)] == 1
        assert scorer[("winnow_gpu_requested", (("worker", worker),))] == 0
        assert scorer[("winnow_worker_up", (("worker", worker),))] == 1
        assert ("winnow_budget_left_in_window", (("worker", worker),)) in scorer
    assert any(name == "winnow_labeling_verdict" for name, _ in scorer)
    assert 'winnow_trainer_releases_total{result="rejected"} 0.0' in scrape(roles["trainer"])
    assert "winnow_label_app_queue_depth " in scrape(roles["label-app"])
