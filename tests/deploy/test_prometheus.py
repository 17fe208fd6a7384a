"""A real Prometheus (Debian's 2.42 server) scrapes a demo run with a drift shift, evaluates
the shipped alert rules as they are, and its own API shows the drift alert firing."""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.prometheus_tools import (
    ROOT,
    RULES,
    free_port,
    get_json,
    rule_groups,
    stop,
    tool,
    wait_for,
)

pytestmark = pytest.mark.slow

ALERT = "WinnowDriftAlarm"
WITHIN_S = 240.0


def alarms(url: str, at: float | None = None) -> float:
    """Drift alarms counted so far, as Prometheus has them now or at the time ``at``."""
    query = {"query": "sum(winnow_drift_alarms_total)", **({"time": f"{at:.3f}"} if at else {})}
    result = get_json(f"{url}/api/v1/query?{urllib.parse.urlencode(query)}")["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """Prometheus with the shipped rules, scraping (every second) a scorer on a port it gives."""
    binary, port, target = tool("prometheus"), free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "winnow-scorer",
                        "static_configs": [{"targets": [f"127.0.0.1:{target}"]}],
                    }
                ],
            }
        )
    )
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            str(binary),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/-/ready", process, 60)
        yield url, target
    finally:
        stop(process)
        log.close()


def test_a_drift_shift_fires_the_drift_alert_in_prometheus(
    prometheus: tuple[str, int], tmp_path: Path, record_property: Any
) -> None:
    url, port = prometheus
    rules = get_json(f"{url}/api/v1/rules")["data"]["groups"]
    assert sum(len(g["rules"]) for g in rules) == sum(len(g["rules"]) for g in rule_groups())
    # no bootstrap address: the demo starts its own embedded broker
    env = {k: v for k, v in os.environ.items() if k != "WINNOW_KAFKA_BOOTSTRAP"}
    demo = subprocess.Popen(
        [
            sys.executable, "-m", "winnow.cli", "demo",
            "--inject-shift", "brightness",
            "--http-port", str(port),
            "--plot", str(tmp_path / "demo.png"),
        ],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    started, lines = time.monotonic(), []
    shifted: list[tuple[float, float]] = []  # (monotonic, wall clock) of the shift

    def read() -> None:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if "injecting a brightness shift" in line:
                shifted.append((time.monotonic(), time.time()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    firing: list[dict[str, Any]] = []
    try:
        while time.monotonic() - started < WITHIN_S:
            time.sleep(0.5)
            ended = demo.poll() is not None
            alerts = get_json(f"{url}/api/v1/alerts")["data"]["alerts"]
            firing = [
                a for a in alerts if a["labels"]["alertname"] == ALERT and a["state"] == "firing"
            ]
            # A false alarm before the shift would fire it too: the alarms must have grown
            # since the shift (counted by Prometheus as it was then).
            if firing and shifted and alarms(url) > alarms(url, at=shifted[0][1]):
                break
            firing = []
            if ended:
                break
        fired = time.monotonic()
        targets = get_json(f"{url}/api/v1/targets")["data"]["activeTargets"]
    finally:
        stop(demo)
        reader.join(timeout=10)
        if demo.stdout is not None:
            demo.stdout.close()
    output = "".join(lines)[-4000:]
    assert firing, f"{ALERT} did not fire within {WITHIN_S:.0f} s; demo output:\n{output}"
    assert any(t["labels"]["job"] == "winnow-scorer" for t in targets)
    assert {a["labels"]["detector"] for a in firing} <= {"embedding", "prediction", "uncertainty"}
    assert all(a["labels"]["severity"] == "warning" for a in firing)
    after_start, after_shift = fired - started, fired - shifted[0][0]
    record_property("drift_alert_after_start_s", round(after_start, 1))
    record_property("drift_alert_after_shift_s", round(after_shift, 1))
    print(
        f"\n{ALERT} firing in Prometheus {after_start:.1f} s after the demo started, "
        f"{after_shift:.1f} s after the shift was injected "
        f"({', '.join(sorted(a['labels']['detector'] for a in firing))})"
    )
