"""Errors of the online role.

The base, ``ConfigError`` and ``BrokerError`` come from ``infra.errors``, shared
with the trainer; here are the kinds only the online role raises.
"""

from infra.errors import BrokerError, ConfigError, WinnowError
from schemas.dead_letter import DeadLetterReason

__all__ = ["BrokerError", "ConfigError", "ModelError", "PoisonRecord", "WinnowError"]


class ModelError(WinnowError):
    """A model that cannot be loaded or does not follow the model contract."""


class PoisonRecord(WinnowError):
    """A record that can never be processed; it belongs on the dead-letter topic."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: DeadLetterReason = reason
        self.detail = detail
