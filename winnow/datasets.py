"""Offline image datasets as streams of encoded frames.

scikit-learn's digits ship with the package (real handwritten digits, 8x8);
any ``.npz`` in the MedMNIST layout (``{train,val,test}_{images,labels}``) can
be streamed too, e.g. ``../shared/data/pneumoniamnist.npz``.
"""

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ImageDataset:
    """Images (N x H x W or N x H x W x 3, uint8), integer labels and class names."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]

    @property
    def channels(self) -> int:
        return 3 if self.train_images.ndim == 4 else 1


def load_digits_dataset(test_fraction: float = 0.25, seed: int = 0) -> ImageDataset:
    """scikit-learn's 1,797 handwritten digits, scaled to 0..255, split with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(images))
    cut = int(len(images) * (1 - test_fraction))
    train, test = order[:cut], order[cut:]
    return ImageDataset(
        "digits",
        images[train],
        labels[train],
        images[test],
        labels[test],
        [str(d) for d in range(10)],
    )


def load_npz_dataset(path: Path) -> ImageDataset:
    """A MedMNIST-layout ``.npz``; class names are the label values as text."""
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} not found")
    with np.load(path) as data:
        missing = {"train_images", "train_labels", "test_images", "test_labels"} - set(data.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}: not in the MedMNIST layout")
        train_x, test_x = data["train_images"], data["test_images"]
        train_y = data["train_labels"].reshape(-1).astype(np.int64)
        test_y = data["test_labels"].reshape(-1).astype(np.int64)
    classes = [str(c) for c in range(int(max(train_y.max(), test_y.max())) + 1)]
    return ImageDataset(path.stem, train_x, train_y, test_x, test_y, classes)


def load_dataset(name_or_path: str) -> ImageDataset:
    if name_or_path == "digits":
        return load_digits_dataset()
    return load_npz_dataset(Path(name_or_path))


def with_minority_share(
    dataset: ImageDataset, share: float, minority: int | None = None, seed: int = 0
) -> ImageDataset:
    """The dataset with one class subsampled to ``share`` of the training stream.

    The test split is left as it is: an imbalanced stream is judged on the
    same test frames, by a measure that weighs the classes alike (balanced
    accuracy).

    Args:
        dataset: the source.
        share: the fraction of the training frames the class keeps, in (0, its share now).
        minority: the class index; by default the least frequent training class
            (the lowest index on ties).
        seed: which of its frames are kept.

    Raises:
        ValueError: ``share`` is not below the class's share now, or keeps no frame.
    """
    counts = np.bincount(dataset.train_labels, minlength=len(dataset.classes))
    if minority is None:
        minority = int(np.argmin(counts))
    if not 0 <= minority < len(dataset.classes):
        raise ValueError(f"class {minority} is not one of {len(dataset.classes)} classes")
    rest = int(counts.sum() - counts[minority])
    now = counts[minority] / counts.sum()
    if not 0 < share < now:
        raise ValueError(f"class {minority} is {now:.1%} of the stream; ask for less than that")
    # k / (k + rest) = share, rounded down so the class is at most ``share`` of the stream
    keep_count = int(share * rest / (1 - share))
    if keep_count < 1:
        raise ValueError(f"a share of {share} keeps no frame of class {minority}")
    frames = np.flatnonzero(dataset.train_labels == minority)
    kept = np.random.default_rng(seed).choice(frames, size=keep_count, replace=False)
    keep = dataset.train_labels != minority
    keep[kept] = True
    return ImageDataset(
        f"{dataset.name}-class{minority}@{share:g}",
        dataset.train_images[keep],
        dataset.train_labels[keep],
        dataset.test_images,
        dataset.test_labels,
        dataset.classes,
    )


def video_bursts(images: np.ndarray, burst: int, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """Each image as ``burst`` consecutive near-copies, as endoscope or camera video looks.

    Each copy is shifted by up to a pixel each way and gets Gaussian sensor
    noise (σ = 4 grey levels).

    Returns:
        The frames (``burst`` per image, in order) and the index of the image
        each frame comes from.
    """
    rng = np.random.default_rng(seed)
    out = []
    for image in images:
        for _ in range(burst):
            dy, dx = rng.integers(-1, 2, size=2)
            shifted = np.roll(image, (int(dy), int(dx)), axis=(0, 1))
            noisy = shifted.astype(np.float32) + rng.normal(0, 4, size=shifted.shape)
            out.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return np.stack(out), np.repeat(np.arange(len(images)), burst)


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
