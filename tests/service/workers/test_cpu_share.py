"""Scorer processes on one machine share its CPUs instead of each sizing to all of them."""

import logging
from pathlib import Path

import pytest

from infra.cpus import available_cpus
from service.config import ScorerSettings, Settings
from service.model.watcher import load_and_warm
from service.runtime import _load_model
from service.workers.serve import worker_env


def _intra_op_threads(model: object) -> int:
    return model._session.get_session_options().intra_op_num_threads  # type: ignore[attr-defined]


@pytest.mark.parametrize("workers", [2, 3, 64])
def test_each_worker_gets_its_share_of_the_cpus(workers: int) -> None:
    env = worker_env(Settings(workers=workers), environ={})
    assert env["WINNOW_SCORER_CPU_THREADS"] == str(max(1, available_cpus() // workers))
    assert env["WINNOW_WORKERS"] == "1"


def test_threads_the_operator_set_are_kept() -> None:
    settings = Settings(workers=4, scorer=ScorerSettings(cpu_threads=3))
    env = worker_env(settings, environ={"WINNOW_SCORER_CPU_THREADS": "3"})
    assert env["WINNOW_SCORER_CPU_THREADS"] == "3"


def test_the_scorer_sizes_onnx_runtime_and_decoding_from_its_settings(
    digits_model_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WINNOW_SCORER_CPU_THREADS", "1")
    settings = Settings(device="cpu", scorer=ScorerSettings(model_path=digits_model_path))
    assert settings.scorer.inference_threads == 1
    with caplog.at_level(logging.INFO, logger="service.model.inference"):
        model = _load_model(settings)
    assert model is not None and _intra_op_threads(model) == 1
    assert "cpu_threads=1" in caplog.text  # the operator sees what was chosen
    release = load_and_warm(digits_model_path.read_bytes(), "cpu", 1)
    assert _intra_op_threads(release) == 1


def test_decode_threads_default_to_half_the_cpus_at_most_four() -> None:
    assert ScorerSettings().decode_threads == max(1, min(4, available_cpus() // 2))
    assert ScorerSettings(decode_workers=7).decode_threads == 7


def test_negative_thread_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="cpu_threads"):
        ScorerSettings(cpu_threads=-1)


@pytest.mark.parametrize(
    ("threads", "at_once", "each"), [(1, 1, 1), (2, 2, 1), (4, 4, 1), (8, 4, 2), (64, 4, 16)]
)
def test_batches_at_once_share_the_threads(threads: int, at_once: int, each: int) -> None:
    """``batches`` (the default): one batch per thread, at most four at once."""
    scorer = ScorerSettings(cpu_threads=threads)
    assert (scorer.concurrent_batches, scorer.inference_threads) == (at_once, each)


def test_unset_threads_count_the_cpus_the_process_may_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("service.config.available_cpus", lambda: 6)
    scorer = ScorerSettings()
    assert (scorer.concurrent_batches, scorer.inference_threads) == (4, 1)


def test_operators_run_one_batch_across_every_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WINNOW_SCORER_CPU_PARALLELISM", "operators")
    assert ScorerSettings(cpu_threads=8).concurrent_batches == 1
    assert ScorerSettings(cpu_threads=8).inference_threads == 8
    monkeypatch.setattr("service.config.cpu_limit", lambda: None)  # no mask, no quota
    assert ScorerSettings().inference_threads is None  # ONNX Runtime's own default
    with pytest.raises(ValueError, match="cpu_parallelism"):
        ScorerSettings(cpu_parallelism="cores")  # type: ignore[arg-type]
