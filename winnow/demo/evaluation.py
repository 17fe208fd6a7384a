"""Honest figures for the demo: test accuracy of each served model, and of full labeling."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from schemas.model_spec import ModelSpec
from schemas.pixels import image_to_input
from winnow.datasets import ImageDataset


@dataclass(frozen=True)
class Point:
    """One served model: labels it learned from, and its accuracy on the test split."""

    version: str
    labels: int
    accuracy: float
    head: bool = False
    """A head-only release (the head refit on the backbone of the model before)."""


def test_inputs(data: ImageDataset, spec: ModelSpec) -> np.ndarray:
    """The test split as model input, preprocessed exactly as the scorer does."""
    return np.stack([image_to_input(Image.fromarray(image), spec) for image in data.test_images])


def onnx_accuracy(model: object, inputs: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of a loaded ``OnnxModel`` on preprocessed inputs."""
    predicted = np.concatenate(
        [
            model.run(inputs[start : start + 256])[0].argmax(axis=1)  # type: ignore[attr-defined]
            for start in range(0, len(inputs), 256)
        ]
    )
    return float((predicted == labels).mean())


def full_label_accuracy(data: ImageDataset, spec: ModelSpec, seed: int = 0) -> float:
    """The same architecture and start, trained on every training label: the yardstick."""
    from trainer.architectures import build_model
    from trainer.evaluate import accuracy
    from trainer.finetune import FinetuneConfig, finetune_round, select_device
    from trainer.model_init import seed_everything
    from trainer.samples import Sample

    seed_everything(seed)
    model = build_model(spec.arch, len(spec.classes), spec.channels)
    device = select_device("auto")

    def samples(images: np.ndarray, labels: np.ndarray, tag: str) -> list[Sample]:
        return [
            Sample(f"{tag}{i}", image_to_input(Image.fromarray(image), spec), int(label))
            for i, (image, label) in enumerate(zip(images, labels, strict=True))
        ]

    train = samples(data.train_images, data.train_labels, "train")
    steps = max(600, 10 * len(train) // 32)
    config = FinetuneConfig.for_arch(
        spec.arch, epochs=10, max_steps=steps, min_steps=steps, replay_min=0, seed=seed
    )
    finetune_round(model, train, [], config, device)
    return accuracy(model, samples(data.test_images, data.test_labels, "test"), device)


def plot(points: list[Point], full: float, path: str | Path, title: str) -> None:
    """Accuracy against labels, with full labeling as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(
        [p.labels for p in points],
        [p.accuracy for p in points],
        "o-",
        label="Winnow (active, budgeted)",
    )
    ax.axhline(full, color="grey", linestyle="--", label=f"all training labels ({full:.3f})")
    ax.set_xlabel("labels learned from (the holdout share excluded)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
