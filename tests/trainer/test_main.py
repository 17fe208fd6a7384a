"""`winnow train`'s entry point: a refusal Kafka will keep giving ends it with one line."""

import logging

import pytest
from aiokafka.errors import SaslAuthenticationFailed

import trainer.main
from infra.kafka.settings import KafkaSettings
from trainer.config import TrainerSettings
from trainer.main import run_trainer


def _settings(tmp_path) -> TrainerSettings:
    return TrainerSettings(kafka=KafkaSettings(bootstrap="127.0.0.1:9"), data_dir=tmp_path)


def _the_one_error_line(
    error: Exception, tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> str:
    """Runs the trainer with a loop that raises ``error``: exit 1 and one ERROR line, without
    a traceback, whose text is returned."""

    async def failing(settings: TrainerSettings) -> int:
        raise error

    monkeypatch.setattr(trainer.main, "_run", failing)
    assert run_trainer(_settings(tmp_path)) == 1
    lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and lines[0].exc_info is None
    return lines[0].getMessage()


def test_a_fatal_kafka_refusal_exits_1_with_one_line(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Catches a trainer that ends a refused login with a traceback (or exit 0), so the
    orchestrator does not restart it and nobody reads what Kafka refused."""

    line = _the_one_error_line(
        SaslAuthenticationFailed("wrong password for user winnow"), tmp_path, monkeypatch, caplog
    )
    assert line.startswith("trainer: Kafka refused")
    assert "wrong password" in line


def test_other_failures_still_raise(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a catch-all that would turn a bug into a quiet exit 1 without its traceback."""

    async def broken(settings: TrainerSettings) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(trainer.main, "_run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_trainer(_settings(tmp_path))


def test_a_winnow_error_exits_1_with_one_line(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Catches a reason given on purpose (a store that cannot be opened, a loop that
    refuses to go on) ending in a traceback instead of its one line."""
    from trainer.errors import TrainerError

    line = _the_one_error_line(
        TrainerError("the label store at /data is not writable"), tmp_path, monkeypatch, caplog
    )
    assert line == "trainer stopped: the label store at /data is not writable"


def test_the_torch_threads_setting_reaches_torch_and_0_follows_the_cpu_limit(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches ``WINNOW_TRAINER_TORCH_THREADS`` read and never applied (beside a busy scorer
    on 2 cores a round of the soak's model took 57 to 71 CPU-seconds with torch's two
    threads, 4.1 with one), and 0 ignoring a CPU quota (torch counts the node's cores) or
    overriding torch's default where there is none."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("WINNOW_TRAINER_TORCH_THREADS", "1")
        settings = TrainerSettings(kafka=KafkaSettings(bootstrap="127.0.0.1:9"), data_dir=tmp_path)
        assert settings.torch_threads == 1
        trainer.main.apply_torch_threads(settings)
        assert torch.get_num_threads() == 1

        auto = _settings(tmp_path).model_copy(update={"torch_threads": 0})
        torch.set_num_threads(2)
        monkeypatch.setattr(trainer.main, "cpu_limit", lambda: None)  # no quota, no mask
        trainer.main.apply_torch_threads(auto)
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(trainer.main, "cpu_limit", lambda: 1)  # a pod limited to 1 CPU
        trainer.main.apply_torch_threads(auto)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
