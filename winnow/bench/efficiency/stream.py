"""The stream a run replays and the test split it is judged on, preprocessed once.

Frames are preprocessed as the scorer does (``schemas.pixels.image_to_input``
with the model spec's size and normalization). ``--video`` turns each image
into a burst of near-copies; ``--imbalance`` subsamples one class of the
training stream (``winnow.datasets``). With ``--pretrained`` the frames are
passed once through the frozen pretrained backbone and the cached features are
what the learner and the strategies see (see :mod:`.pretrained`).

The measure is balanced accuracy when a class is under its share limit of the
stream (:func:`.curves.is_imbalanced`), plain accuracy otherwise; a run may
force either.
"""

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from winnow.bench.efficiency.curves import is_imbalanced
from winnow.bench.efficiency.errors import BenchConfigError

Measure = Literal["accuracy", "balanced_accuracy"]


@dataclass(frozen=True)
class StreamConfig:
    """What the stream is made of.

    Attributes:
        dataset: ``digits`` or a path to an ``.npz`` in the MedMNIST layout.
        video: bursts of ``burst`` near-copies per image.
        burst: frames per burst.
        imbalance: the share of the stream left to ``minority`` (None: as it is).
        minority: the class subsampled (None: the least frequent).
        measure: ``auto`` picks balanced accuracy for an imbalanced stream.
        pretrained: frozen pretrained features (EfficientNet-Lite0) instead of
            training the small CNN from scratch.
        input_size: model input side (None: 16 for digits, 28 for other
            ``.npz``, 224 with ``pretrained``).
        workers: threads for the one-off feature extraction.
    """

    dataset: str = "digits"
    video: bool = False
    burst: int = 5
    imbalance: float | None = None
    minority: int | None = None
    measure: Literal["auto", "accuracy", "balanced_accuracy"] = "auto"
    pretrained: bool = False
    input_size: int | None = None
    workers: int = 2


@dataclass
class StreamData:
    """The preprocessed stream and test split.

    Attributes:
        inputs: model input of each stream frame (N x C x H x W), or its cached
            features (N x D) with ``features``.
        labels: the oracle's answer for each frame.
        bursts: the source image of each frame; a pass permutes images and
            keeps each burst in order.
        test_inputs: the test split, as ``inputs``.
        test_labels: its labels.
        classes: class names.
        arch: the learner's architecture.
        channels: image channels.
        measure: what the curves record.
        features: inputs are frozen-backbone features, not images.
        info: a JSON-ready description (name, frames, class counts, costs).
    """

    inputs: np.ndarray
    labels: np.ndarray
    bursts: np.ndarray
    test_inputs: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    arch: str
    channels: int
    measure: Measure
    features: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> np.ndarray:
        """Source image of each distinct image, one frame each (the full-data learner's set)."""
        return np.unique(self.bursts, return_index=True)[1]


def _spec(classes: list[str], channels: int, size: int, arch: str) -> Any:
    from schemas.model_spec import ModelSpec
    from trainer.model_init import default_normalization

    # What the pretrained weights expect; the small CNN keeps the channel defaults.
    mean, std = (
        default_normalization(channels, arch)
        if arch != "small-cnn"
        else default_normalization(channels)
    )
    return ModelSpec(
        version="bench",
        arch=arch,
        classes=classes,
        input_size=(size, size),
        channels=channels,  # type: ignore[arg-type]
        mean=mean,
        std=std,
        embedding_dim=128,
    )


def _preprocess(images: np.ndarray, spec: Any) -> np.ndarray:
    from PIL import Image

    from schemas.pixels import image_to_input

    return np.stack([image_to_input(Image.fromarray(i), spec) for i in images])


def prepare(config: StreamConfig) -> StreamData:
    """Loads the dataset, builds the stream and preprocesses it as the scorer does.

    Raises:
        FileNotFoundError: the ``.npz`` is not there.
        BenchConfigError: an imbalance the dataset cannot give, or ``pretrained``
            without the architecture in the trainer.
    """
    from winnow.datasets import load_dataset, video_bursts, with_minority_share

    data = load_dataset(config.dataset)
    if config.imbalance is not None:
        try:
            data = with_minority_share(data, config.imbalance, config.minority)
        except ValueError as error:
            raise BenchConfigError(f"--imbalance: {error}") from None
    size = config.input_size or (224 if config.pretrained else 16 if data.name == "digits" else 28)
    arch = "small-cnn"
    if config.pretrained:
        from winnow.bench.efficiency.pretrained import PRETRAINED_ARCH, check_available

        check_available()
        arch = PRETRAINED_ARCH
    spec = _spec(list(data.classes), data.channels, size, arch)
    train_images, train_labels = data.train_images, data.train_labels
    bursts = np.arange(len(train_images))
    if config.video:
        train_images, bursts = video_bursts(train_images, config.burst)
        train_labels = np.repeat(train_labels, config.burst)
    counts = np.bincount(train_labels, minlength=len(data.classes))
    measure: Measure
    if config.measure == "auto":
        measure = "balanced_accuracy" if is_imbalanced(counts.tolist()) else "accuracy"
    else:
        measure = config.measure
    stream = StreamData(
        _preprocess(train_images, spec),
        train_labels.astype(np.int64),
        bursts,
        _preprocess(data.test_images, spec),
        data.test_labels.astype(np.int64),
        list(data.classes),
        arch,
        data.channels,
        measure,
        info={
            "name": data.name,
            "frames": len(train_labels),
            "images": len(np.unique(bursts)),
            "test_frames": len(data.test_labels),
            "class_counts": counts.tolist(),
            "class_shares": [round(float(c), 4) for c in counts / counts.sum()],
            "input_size": size,
            "measure": measure,
        },
    )
    if config.pretrained:
        from winnow.bench.efficiency.pretrained import cache_features

        stream = cache_features(stream, config.workers)
    return stream


def stream_pass(
    bursts: np.ndarray, rng: np.random.Generator, asked: set[int], video: bool
) -> np.ndarray:
    """One pass over the stream in a random order, without the frames already asked.

    In video mode the images are permuted and each burst stays in order, as a
    camera's consecutive frames do.
    """
    images = np.unique(bursts)
    order_images = rng.permutation(images)
    if video:
        first = np.searchsorted(bursts, order_images)  # bursts are contiguous and sorted
        ends = np.searchsorted(bursts, order_images, side="right")
        order = np.concatenate([np.arange(a, b) for a, b in zip(first, ends, strict=True)])
    else:
        order = order_images
    return np.array([i for i in order.tolist() if i not in asked], dtype=np.int64)
