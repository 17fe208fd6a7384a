"""``winnow bench throughput`` end to end, on a tiny digits configuration.

Checks the shape and consistency of what the benchmark writes, never its speed.
"""

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from infra.kafka.broker import EmbeddedBroker
from winnow.bench.host_cost import STAGES
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


def _bench_digits(out: Path, *extra: str) -> int:
    """``winnow bench throughput`` on 200 digits frames at batch 8 on the CPU, JSON to ``out``."""
    common = ["--cases", "digits", "--frames", "200", "--batch-size", "8", "--device", "cpu"]
    return main(["bench", "throughput", "--json", str(out), *common, *extra])


@pytest.mark.slow
def test_bench_throughput_writes_complete_json(
    kafka_broker: EmbeddedBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("WINNOW_KAFKA_BOOTSTRAP", kafka_broker.bootstrap)
    out = tmp_path / "bench" / "throughput.json"

    code = _bench_digits(out)

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
    assert [run["batch_size"] for run in case["by_batch_size"]] == [8, 16, 64]
    for run in case["by_batch_size"]:
        _assert_host_cost(run)
    # The profile saw the work a scored frame needs. Summed over the batch sizes: at batch 64
    # the 200 frames make about four deliveries, which a 2 ms sampling profile can miss.
    seen = {
        stage: sum(run["stages_cpu_ms_per_frame"][stage] for run in case["by_batch_size"])
        for stage in ("decode", "infer", "deliver")
    }
    assert all(v > 0 for v in seen.values()), seen
    [main_run] = [run for run in case["by_batch_size"] if run["batch_size"] == 8]
    assert main_run["scorer_fps"] == case["scorer_fps"]
    assert main_run["scorer_cpu_ms_per_frame"] == case["scorer_cpu_ms_per_frame"]
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


def _assert_host_cost(run: dict[str, Any]) -> None:
    """The scorer's CPU time per frame is real, and the stages share exactly that time."""
    cpu = run["scorer_cpu_ms_per_frame"]
    # A frame costs CPU time, and no more than every core for the frame's share of the run.
    assert 0 < cpu < (os.cpu_count() or 1) * 1000 / run["scorer_fps"] * 2, run
    stages = run["stages_cpu_ms_per_frame"]
    assert list(stages) == list(STAGES)
    assert all(v >= 0 for v in stages.values()), stages
    assert sum(stages.values()) == pytest.approx(cpu, rel=0.1, abs=0.005), stages
    assert run["profile_samples"] > 0
    assert run["threads_cpu_ms_per_frame"]["MainThread"] > 0
    assert run["efficiency"] == pytest.approx(run["scorer_fps"] / run["bare_fps"])


def test_unknown_case_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown case 'webcam'"):
        main(["bench", "throughput", "--json", str(tmp_path / "x.json"), "--cases", "webcam"])
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_bench_throughput_measures_every_worker_count_without_the_naive_loop(
    kafka_broker: EmbeddedBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WINNOW_KAFKA_BOOTSTRAP", kafka_broker.bootstrap)
    out = tmp_path / "throughput.json"

    code = _bench_digits(out, "--batch-sizes", "8,16", "--workers", "2,1", "--no-naive")

    assert code == 0
    [case] = json.loads(out.read_text())["cases"]
    assert case["naive_fps"] is None and case["speedup_vs_naive"] is None
    assert case["partitions"] >= 2  # one at least for each scorer process
    grid = {(run["workers"], run["batch_size"]): run for run in case["by_workers"]}
    assert sorted(grid) == [(1, 8), (1, 16), (2, 8), (2, 16)]
    for (_, size), run in grid.items():
        _assert_host_cost(run)
        assert run["gpu"] is None  # no CUDA here
        if size == 8:  # latency at half of each worker count's speed, at the main batch size
            assert 0 < run["p50_ms"] <= run["p99_ms"], run
            assert run["latency_rate_fps"] == pytest.approx(run["scorer_fps"] / 2, rel=0.01)
        else:
            assert "p99_ms" not in run
    # The main run is the first worker count's, at the main batch size.
    assert case["scorer_fps"] == grid[(2, 8)]["scorer_fps"]
    assert [run["batch_size"] for run in case["by_batch_size"]] == [8, 16]
    assert all(run["workers"] == 2 for run in case["by_batch_size"])


def test_camera_frames_at_a_size_cycle_through_distinct_frames() -> None:
    from PIL import Image

    from winnow.bench.throughput import DISTINCT_SIZED_FRAMES, camera_frames

    frames = camera_frames(DISTINCT_SIZED_FRAMES + 2, size=(96, 64))

    assert len(frames) == DISTINCT_SIZED_FRAMES + 2
    assert frames[DISTINCT_SIZED_FRAMES] == frames[0] and frames[1] != frames[0]
    assert len(set(frames)) == DISTINCT_SIZED_FRAMES
    assert Image.open(io.BytesIO(frames[1])).size == (96, 64)


@pytest.mark.parametrize("text", ["0", "1,-2", "a", ""])
def test_worker_counts_must_be_positive_numbers(text: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "throughput", "--json", str(tmp_path / "x.json"), "--workers", text])
    assert not (tmp_path / "x.json").exists()


_BROKEN_ENGINE = """
import service.scoring.engine as _engine


def _broken(self, *args, **kwargs):
    raise RuntimeError("injected inference failure")


_engine.ScoringEngine.forward = _broken
"""


@pytest.mark.slow
def test_a_scorer_that_fails_in_its_process_fails_the_bench_with_its_log(
    kafka_broker: EmbeddedBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches a scorer process that hung once its scorer failed (the scorer's tasks were
    left running, so the process never ended) and left the bench waiting 10 minutes for
    predictions. The failure is injected into the child only, by a ``sitecustomize``."""
    import threading

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_BROKEN_ENGINE)
    paths = [str(inject), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    monkeypatch.setenv("WINNOW_KAFKA_BOOTSTRAP", kafka_broker.bootstrap)
    outcome: dict[str, Any] = {}

    def bench() -> None:
        try:
            outcome["code"] = _bench_digits(tmp_path / "t.json", "--no-naive")
        except Exception as error:  # what the bench raises is the assertion
            outcome["error"] = error

    thread = threading.Thread(target=bench, daemon=True)
    thread.start()
    thread.join(180)
    assert not thread.is_alive(), "the bench still waits for a scorer process that failed"
    error = outcome.get("error")
    message = str(error)
    assert "the scorer process exited" in message and "injected inference failure" in message
    # what the reader says under it: the child ended, not a 10-minute timeout
    assert "arrived before a scorer process ended" in str(getattr(error, "__context__", ""))
