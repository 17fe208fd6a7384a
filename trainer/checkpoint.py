"""The trainer's own checkpoints: weights and spec, written atomically.

A directory holds one ``<version>.pt`` per saved version and a ``latest``
file naming the newest. Both are written to a temporary file in the same
directory, flushed to disk and renamed over the target, so a crash leaves
either the old or the new file, never half of one; ``latest`` is moved only
after the checkpoint it names is complete. No optimizer state is kept: each
fine-tuning round starts a fresh optimizer.
"""

import logging
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from schemas.model_spec import ModelSpec
from trainer.architectures import WinnowNet, build_model
from trainer.errors import CheckpointError, ModelBuildError

log = logging.getLogger(__name__)

LATEST = "latest"
SUFFIX = ".pt"
_FORMAT = 1


def save_checkpoint(directory: Path, model: nn.Module, spec: ModelSpec) -> Path:
    """Writes ``<spec.version>.pt`` into ``directory`` and points ``latest`` at it.

    Returns:
        The checkpoint file.

    Raises:
        CheckpointError: a version that is not a plain file name, or a write
            that failed.
    """
    name = spec.version + SUFFIX
    if Path(name).name != name or spec.version in ("", ".", ".."):
        raise CheckpointError(f"version '{spec.version}' cannot name a checkpoint file")
    payload: dict[str, Any] = {
        "format": _FORMAT,
        "spec": spec.model_dump_json(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / name
        _write_atomic(path, lambda f: torch.save(payload, f))
        _write_atomic(directory / LATEST, lambda f: f.write(name.encode("utf-8") + b"\n"))
    except OSError as exc:
        raise CheckpointError(f"cannot write a checkpoint to {directory}: {exc}") from exc
    log.info("checkpoint saved path=%s version=%s", path, spec.version)
    return path


def load_checkpoint(path: Path) -> tuple[WinnowNet, ModelSpec]:
    """Rebuilds the model and spec from a checkpoint file (or a directory's latest).

    The model comes back on the CPU in eval mode.

    Raises:
        CheckpointError: no such checkpoint, or one that does not load.
    """
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"no checkpoint in {path}")
        path = latest
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a Winnow checkpoint (format {_FORMAT})")
    try:
        spec = ModelSpec.model_validate_json(payload["spec"])
        model = build_model(spec.arch, len(spec.classes), spec.channels)
        model.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, ValueError, RuntimeError, ModelBuildError) as exc:
        raise CheckpointError(f"checkpoint {path} does not rebuild its model: {exc}") from exc
    model.eval()
    return model, spec


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint ``latest`` names, or ``None`` when there is none."""
    try:
        name = (directory / LATEST).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not name or Path(name).name != name:
        return None
    path = directory / name
    return path if path.is_file() else None


def _write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Writes via a temporary file in the same directory, fsync and rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
