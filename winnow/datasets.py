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


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
