"""The base of every Winnow error, with retriability as data.

Poison input (a record that can never be processed) and transient failures
(broker, GPU) are different kinds: the first goes to the dead-letter topic, the
second is retried with backoff. ``retriable`` says which, and the code that
decides whether to retry reads it (``infra.kafka.delivery``).
"""

from typing import ClassVar


class WinnowError(Exception):
    """Base of all of Winnow's errors; each role's errors derive from it."""

    retriable: ClassVar[bool] = False


class ConfigError(WinnowError):
    """Settings that cannot work (a missing model, a bad address)."""


class BrokerError(WinnowError):
    """The broker could not be reached or refused a request; worth retrying."""

    retriable: ClassVar[bool] = True
