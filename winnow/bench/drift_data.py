"""The drift benchmark's data: a model's outputs on held-out frames, undrifted and shifted.

``winnow bench drift`` fine-tunes a small CNN on 70 % of a dataset's training
split and computes its outputs once on the frames it did not see (the other
30 % and the test split), undrifted and under each shift; streams are
resampled from those outputs, so hundreds of runs are cheap.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from schemas.drift import DriftReference
from service.drift import Rows
from winnow.datasets import ImageDataset

SHIFTS = ("brightness", "contrast", "blur", "noise", "rotation", "class_mix", "new_camera")
OTHER_DATASET = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "pneumoniamnist.npz"
)


@dataclass
class Features:
    rows: Rows
    confidence: np.ndarray  # max probability per frame


@dataclass
class HeldOut:
    """The model's outputs on the frames it was not trained on, undrifted and shifted."""

    embeddings: dict[str, np.ndarray]  # "none" (undrifted) or a shift name -> N x D
    probabilities: dict[str, np.ndarray]
    labels: np.ndarray  # of the undrifted frames

    def rows(self, reference: DriftReference, name: str, index: np.ndarray) -> Features:
        probabilities = self.probabilities[name][index]
        rows = Rows.from_outputs(reference, self.embeddings[name][index], probabilities)
        return Features(rows, probabilities.max(axis=1))


# -- the model and its outputs ----------------------------------------------------------------


def train_model(data: ImageDataset, seed: int) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """A small CNN fine-tuned on 70 % of the train split; returns it, its spec, and the
    remaining 30 % (images, labels) for the reference."""
    import torch

    from schemas.model_spec import ModelSpec
    from trainer.architectures import build_model
    from trainer.finetune import FinetuneConfig, finetune_round
    from trainer.model_init import default_normalization, seed_everything
    from trainer.samples import Sample

    seed_everything(seed)
    size = 16 if data.name == "digits" else 28
    model = build_model("small-cnn", len(data.classes), data.channels)
    mean, std = default_normalization(data.channels)
    spec = ModelSpec(
        version="bench",
        arch="small-cnn",
        classes=data.classes,
        input_size=(size, size),
        channels=data.channels,  # type: ignore[arg-type]
        mean=list(mean),
        std=list(std),
        embedding_dim=model.embedding_dim,
    )
    order = np.random.default_rng(seed).permutation(len(data.train_images))
    cut = int(0.7 * len(order))
    fit = order[:cut][:4000]
    inputs = _inputs(data.train_images[fit], spec)
    samples = [
        Sample(str(i), x, int(y))
        for i, x, y in zip(fit, inputs, data.train_labels[fit], strict=True)
    ]
    # The model the drift figures were measured with: 200 steps, not shrunk.
    config = FinetuneConfig.for_arch(
        "small-cnn", epochs=8, max_steps=400, min_steps=200, shrink=1.0, perturb=0.0, seed=seed
    )
    finetune_round(model, samples, [], config, torch.device("cpu"))
    rest = order[cut:][:3000]
    return model, spec, data.train_images[rest], data.train_labels[rest]


def _inputs(images: np.ndarray, spec: Any) -> np.ndarray:
    from schemas.pixels import image_to_input

    return np.stack([image_to_input(Image.fromarray(im), spec) for im in images])


def _outputs(model: Any, spec: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from trainer.reference import model_outputs

    probabilities, embeddings = model_outputs(model, _inputs(images, spec), torch.device("cpu"))
    return embeddings, probabilities


def held_out(
    data: ImageDataset,
    shifts: tuple[str, ...],
    seed: int,
    progress: Callable[[str], None] = lambda m: None,
) -> HeldOut:
    """Fine-tunes the model and returns its outputs on the frames it did not see."""
    progress(f"fine-tuning small-cnn on {data.name}")
    model, spec, rest_images, rest_labels = train_model(data, seed)
    images = np.concatenate([rest_images, data.test_images[:3000]])
    labels = np.concatenate([rest_labels, data.test_labels[:3000]])
    progress(f"computing features of {len(images)} held-out frames under each shift")
    rng = np.random.default_rng(seed)
    embeddings, probabilities = {}, {}
    for name in ("none", *shifts):
        if name == "class_mix":
            continue
        if name == "none":
            shifted = images
        elif name == "new_camera":
            shifted = _other_camera(data, len(images), rng)
        else:
            shifted = shift_images(name, images, rng)
        embeddings[name], probabilities[name] = _outputs(model, spec, shifted)
    return HeldOut(embeddings, probabilities, labels)


# -- shifts -----------------------------------------------------------------------------------


def shift_images(name: str, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The test images under one covariate shift (uint8 in, uint8 out)."""
    x = images.astype(np.float32)
    if name == "brightness":
        return np.clip(x + 70, 0, 255).astype(np.uint8)
    if name == "contrast":
        mean = x.mean(axis=tuple(range(1, x.ndim)), keepdims=True)
        return np.clip((x - mean) * 0.5 + mean, 0, 255).astype(np.uint8)
    if name == "noise":
        return np.clip(x + rng.normal(0, 40, x.shape), 0, 255).astype(np.uint8)
    if name == "blur":
        radius = 0.8 if images.shape[1] <= 16 else 1.5
        return np.stack(
            [
                np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius)))
                for im in images
            ]
        )
    if name == "rotation":
        return np.stack([np.asarray(Image.fromarray(im).rotate(30)) for im in images])
    raise ValueError(f"unknown image shift {name!r}")


def _other_camera(data: ImageDataset, count: int, rng: np.random.Generator) -> np.ndarray:
    """Frames of another dataset, as a new camera would send: pneumonia X-rays for
    digits (if present), else crops of scikit-learn's sample photos."""
    shape = data.test_images.shape[1:]
    if data.name == "digits" and OTHER_DATASET.exists():
        with np.load(OTHER_DATASET) as other:
            images = other["test_images"][:count]
    else:
        from sklearn.datasets import load_sample_images

        photos = load_sample_images().images
        images = []
        for _ in range(count):
            photo = photos[int(rng.integers(len(photos)))]
            y, x = rng.integers(0, photo.shape[0] - 100), rng.integers(0, photo.shape[1] - 100)
            images.append(photo[y : y + 100, x : x + 100])
        images = np.stack(images)
    mode = "L" if len(shape) == 2 else "RGB"
    return np.stack(
        [np.asarray(Image.fromarray(im).convert(mode).resize(shape[:2][::-1])) for im in images]
    )


def shift_stream(
    shift: str,
    held: HeldOut,
    reference: DriftReference,
    clean: Features,
    pool_rows: np.ndarray,
    rng: np.random.Generator,
    runs: int,
    change_at: int,
    horizon: int,
) -> tuple[Features, np.ndarray]:
    """Undrifted pool frames followed by drifted ones, and run indexes into them:
    ``change_at`` undrifted frames, then ``horizon`` drifted ones."""
    if shift == "class_mix":  # half the classes disappear from the stream
        classes = int(held.labels.max()) + 1
        kept = pool_rows[held.labels[pool_rows] < max(1, classes // 2)]
        drifted = held.rows(reference, "none", kept)
    elif shift == "new_camera":
        drifted = held.rows(reference, shift, np.arange(len(held.embeddings[shift])))
    else:  # the same frames as the undrifted pool, shifted
        drifted = held.rows(reference, shift, pool_rows)
    rows = Rows(
        np.concatenate([clean.rows.reduced, drifted.rows.reduced]),
        np.concatenate([clean.rows.classes, drifted.rows.classes]),
        np.concatenate([clean.rows.entropy, drifted.rows.entropy]),
    )
    stream = Features(rows, np.concatenate([clean.confidence, drifted.confidence]))
    before = rng.integers(len(clean.rows), size=(runs, change_at))
    after = len(clean.rows) + rng.integers(len(drifted.rows), size=(runs, horizon))
    return stream, np.concatenate([before, after], axis=1)
