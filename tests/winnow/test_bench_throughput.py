"""``winnow bench throughput`` end to end, on a tiny digits configuration.

Checks the shape and consistency of what the benchmark writes, never its speed.
"""

import json
import math
from pathlib import Path

import pytest

from infra.kafka.broker import EmbeddedBroker
from winnow.bench.throughput import CASE_KEYS, format_table
from winnow.cli import main

POSITIVE = (
    "bare_fps",
    "scorer_fps",
    "naive_fps",
    "efficiency",
    "speedup_vs_naive",
    "p50_ms",
    "p99_ms",
)


@pytest.mark.slow
def test_bench_throughput_writes_complete_json(
    kafka_broker: EmbeddedBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("WINNOW_KAFKA_BOOTSTRAP", kafka_broker.bootstrap)
    out = tmp_path / "bench" / "throughput.json"

    code = main(
        [
            "bench",
            "throughput",
            "--json",
            str(out),
            "--cases",
            "digits",
            "--frames",
            "200",
            "--batch-size",
            "8",
            "--device",
            "cpu",
        ]
    )

    assert code == 0
    result = json.loads(out.read_text())
    machine = result["machine"]
    assert machine["cpu_count"] >= 1
    assert machine["onnxruntime"]
    assert machine["provider"] == "CPUExecutionProvider"
    [case] = result["cases"]
    assert set(CASE_KEYS) <= set(case)
    assert case["model"].startswith("small-cnn")
    assert case["device"] == "cpu"
    assert case["batch_size"] == 8
    assert case["frames"] == 200
    for key in POSITIVE:
        assert isinstance(case[key], float) and case[key] > 0 and math.isfinite(case[key]), key
    assert case["p99_ms"] >= case["p50_ms"]
    assert case["efficiency"] == pytest.approx(case["scorer_fps"] / case["bare_fps"])
    assert case["speedup_vs_naive"] == pytest.approx(case["scorer_fps"] / case["naive_fps"])
    assert "predictions topic" in case["notes"] and "half of scorer_fps" in case["notes"]
    assert result["goals"] == [
        {
            "case": "digits",
            "metric": "speedup_vs_naive",
            "target": 5.0,
            "met": case["speedup_vs_naive"] >= 5.0,
            "value": case["speedup_vs_naive"],
        }
    ]
    printed = capsys.readouterr().out
    assert printed.rstrip("\n") == format_table(result)
    assert "scorer fps" in printed and "goal digits" in printed


def test_unknown_case_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown case 'webcam'"):
        main(["bench", "throughput", "--json", str(tmp_path / "x.json"), "--cases", "webcam"])
    assert not (tmp_path / "x.json").exists()
