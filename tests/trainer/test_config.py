"""The trainer's settings: frozen, and connected through the one KafkaSettings."""

import pytest
from pydantic import ValidationError

from infra.kafka.settings import KafkaSettings
from trainer.config import TRAINER_CLIENT_ID, TrainerSettings


def test_the_trainer_has_its_own_client_id_unless_one_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WINNOW_KAFKA_CLIENT_ID", raising=False)
    assert TrainerSettings().kafka.client_id == TRAINER_CLIENT_ID
    given = KafkaSettings(bootstrap="kafka:9093", security_protocol="SASL_SSL")
    settings = TrainerSettings(kafka=given)
    assert settings.kafka.client_id == TRAINER_CLIENT_ID
    assert (settings.kafka.bootstrap, settings.kafka.security_protocol) == (
        "kafka:9093",
        "SASL_SSL",
    )
    assert given.client_id == "winnow", "the caller's settings are copied, not changed"
    assert TrainerSettings(kafka=KafkaSettings(client_id="mine")).kafka.client_id == "mine"
    monkeypatch.setenv("WINNOW_KAFKA_CLIENT_ID", "from-env")
    assert TrainerSettings().kafka.client_id == "from-env"


def test_settings_are_frozen_and_change_by_copy() -> None:
    settings = TrainerSettings(group_id="a")
    with pytest.raises(ValidationError, match="frozen"):
        settings.group_id = "b"
    assert settings.model_copy(update={"group_id": "b"}).group_id == "b"
    assert settings.group_id == "a"


def test_channels_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart sets WINNOW_TRAINER_CHANNELS; the environment gives text, not an int."""
    monkeypatch.setenv("WINNOW_TRAINER_CHANNELS", "1")
    assert TrainerSettings().channels == 1
    monkeypatch.setenv("WINNOW_TRAINER_CHANNELS", "2")
    with pytest.raises(ValueError, match="channels"):
        TrainerSettings()
