"""Where a trainer's model lineage starts, and the artifact each full release ships.

The first model is the latest checkpoint of the data directory, a given
checkpoint, or a fresh model of the configured architecture (cold start); a
full release's artifact is the model exported to ONNX, checked against torch.
"""

import secrets
import tempfile
from pathlib import Path

from schemas.model_spec import ModelSpec
from trainer.architectures import WinnowNet, build_model
from trainer.checkpoint import latest_checkpoint, load_checkpoint
from trainer.config import TrainerSettings
from trainer.errors import ModelBuildError
from trainer.export import check_parity, export_onnx
from trainer.model_init import default_normalization, seed_everything


def initial_model(settings: TrainerSettings) -> tuple[WinnowNet, ModelSpec, bool]:
    """The latest checkpoint, a given one, or a fresh model (cold start).

    Returns:
        ``(model, spec, fresh)``; ``fresh`` when the model was never released
        from this data directory (a new model or ``init_checkpoint``).

    Raises:
        ModelBuildError: no checkpoint, and fewer than two classes to build one.
        CheckpointError: a checkpoint that does not load.
    """
    found = latest_checkpoint(settings.data_dir / "checkpoints") or settings.init_checkpoint
    if found is not None:
        model, spec = load_checkpoint(found)
        return model, spec, found == settings.init_checkpoint
    if len(settings.classes) < 2:
        raise ModelBuildError(
            "no checkpoint in the data directory: set WINNOW_TRAINER_CLASSES (or --classes) "
            "to at least two class names to create the first model"
        )
    seed_everything(settings.seed)
    arch = settings.first_arch
    model = build_model(
        arch,
        len(settings.classes),
        settings.channels,
        weights=settings.init_weights,
        pretrained=settings.first_pretrained,
    )
    mean, std = default_normalization(settings.channels, arch)
    version = f"0000-init-{secrets.token_hex(3)}"
    spec = ModelSpec(
        name=settings.model_name,
        version=version,
        backbone_version=version,
        arch=arch,
        classes=list(settings.classes),
        input_size=(settings.input_size, settings.input_size),
        channels=settings.channels,
        mean=list(mean),
        std=list(std),
        embedding_dim=model.embedding_dim,
        precision=settings.precision,
        metrics={"generation": 0.0},
    )
    return model, spec, True


def onnx_artifact(model: WinnowNet, spec: ModelSpec) -> bytes:
    """The model as one ONNX file with ``spec`` in its metadata, after the parity check.

    Raises:
        ModelExportError: the export failed or onnxruntime disagrees with torch.
    """
    with tempfile.TemporaryDirectory(prefix="winnow-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, spec, path)
        check_parity(model, path, spec)
        return path.read_bytes()
