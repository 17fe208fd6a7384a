"""Errors of the online role.

Poison input (a record that can never be processed) and transient failures
(broker, GPU) are different kinds: the first goes to the dead-letter topic, the
second is retried with backoff. ``retriable`` says which.
"""

from typing import ClassVar

from schemas.dead_letter import DeadLetterReason


class WinnowError(Exception):
    """Base of the service's errors."""

    retriable: ClassVar[bool] = False


class ConfigError(WinnowError):
    """Settings that cannot work (a missing model, a bad address)."""


class ModelError(WinnowError):
    """A model that cannot be loaded or does not follow the model contract."""


class BrokerError(WinnowError):
    """The broker could not be reached or refused a request; worth retrying."""

    retriable: ClassVar[bool] = True


class PoisonRecord(WinnowError):
    """A record that can never be processed; it belongs on the dead-letter topic."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: DeadLetterReason = reason
        self.detail = detail
