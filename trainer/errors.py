"""Errors of the learning role, with retriability as data.

The base, ``ConfigError`` and ``BrokerError`` come from ``infra.errors``, shared
with the online role; here are the kinds only the trainer raises.
"""

from infra.errors import BrokerError, ConfigError, WinnowError

__all__ = [
    "BrokerError",
    "CheckpointError",
    "ConfigError",
    "DeviceError",
    "ModelBuildError",
    "ModelExportError",
    "SampleError",
    "TrainerError",
    "WinnowError",
]


class TrainerError(WinnowError):
    """Base of the trainer's own errors (not retriable unless a subclass says so)."""


class ModelBuildError(TrainerError):
    """An architecture, size or checkpoint that cannot make a model."""


class ModelExportError(TrainerError):
    """An ONNX export that failed or does not match the torch model."""


class SampleError(TrainerError):
    """A labeled frame that cannot become a training sample (poison input).

    The image bytes do not decode, or the label is not one of the model's
    classes; retrying will not help, so the record goes to the dead-letter
    topic.
    """


class CheckpointError(TrainerError):
    """A checkpoint that cannot be written or read back."""


class DeviceError(TrainerError):
    """A requested device that this machine does not have."""
