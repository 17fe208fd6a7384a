"""Errors of the learning role, with retriability as data."""

from typing import ClassVar


class TrainerError(Exception):
    """Base of the trainer's errors."""

    retriable: ClassVar[bool] = False


class ModelBuildError(TrainerError):
    """An architecture, size or checkpoint that cannot make a model."""


class ModelExportError(TrainerError):
    """An ONNX export that failed or does not match the torch model."""
