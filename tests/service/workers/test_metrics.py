"""One /metrics from the workers' own: every series kept, labelled with its worker."""

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import ScorerMetrics
from service.workers.metrics import PoolMetrics, exposition, merge
from service.workers.pool import Worker
from tests.deploy.prometheus_tools import promtool  # skips a test where promtool is missing


def _scrape(frames: int, version: str) -> str:
    metrics = ScorerMetrics()
    metrics.frames.labels(outcome="not_selected").inc(frames)
    metrics.set_model(version, "CPUExecutionProvider")
    metrics.inference_seconds.observe(0.01)
    metrics.labels_unlearned.set(float("nan"))
    return generate_latest(metrics.registry).decode()


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_each_workers_series_keeps_its_value_under_its_worker_label() -> None:
    body = exposition(merge({0: _scrape(7, "v1"), 1: _scrape(5, "v2")}), CollectorRegistry())
    samples = _samples(body)
    frames = {
        dict(labels)["worker"]: value
        for (name, labels), value in samples.items()
        if name == "winnow_frames_total" and dict(labels)["outcome"] == "not_selected"
    }
    assert frames == {"0": 7, "1": 5}  # the pod's total is their sum
    versions = {
        (dict(labels)["worker"], dict(labels)["version"])
        for (name, labels), _ in samples.items()
        if name == "winnow_model_info"
    }
    assert versions == {("0", "v1"), ("1", "v2")}  # a worker behind on a swap shows
    counts = [v for (name, _), v in samples.items() if name == "winnow_inference_seconds_count"]
    assert counts == [1, 1]


def test_the_exposition_declares_each_family_once() -> None:
    body = exposition(merge({0: _scrape(1, "v"), 1: _scrape(1, "v")}), CollectorRegistry())
    types = [line for line in body.decode().splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    assert "# TYPE winnow_frames_total counter" in types


def test_the_pool_metrics_count_restarts_and_say_which_workers_are_up(tmp_path) -> None:
    metrics = PoolMetrics()
    workers = [Worker(0, tmp_path / "0"), Worker(1, tmp_path / "1", restarts=2)]
    metrics.observe(workers, answered=[0])
    workers[1].restarts = 3
    metrics.observe(workers, answered=[0])
    samples = _samples(generate_latest(metrics.registry))
    assert samples[("winnow_workers", ())] == 2
    assert samples[("winnow_worker_restarts_total", (("worker", "1"),))] == 3
    assert samples[("winnow_worker_restarts_total", (("worker", "0"),))] == 0
    # Not running (no process here): down, whatever the scrape says.
    assert samples[("winnow_worker_up", (("worker", "0"),))] == 0


def test_promtool_accepts_the_merged_exposition() -> None:
    pool = PoolMetrics()
    pool.observe([], answered=[])
    body = exposition(merge({0: _scrape(3, "v1"), 1: _scrape(4, "v1")}), pool.registry)
    linted = promtool("check", "metrics", input_text=body.decode())
    assert linted.returncode == 0 and not linted.stdout.strip(), linted
