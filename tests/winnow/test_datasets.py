"""Stream builders of winnow.datasets: a minority class subsampled, video bursts."""

import numpy as np
import pytest

from winnow.datasets import ImageDataset, video_bursts, with_minority_share


def _dataset(counts: list[int]) -> ImageDataset:
    labels = np.repeat(np.arange(len(counts)), counts)
    images = (np.arange(len(labels))[:, None, None] % 256 * np.ones((1, 4, 4))).astype(np.uint8)
    test = np.arange(len(counts))
    return ImageDataset(
        "toy", images, labels, images[: len(counts)], test, ["a", "b", "c"][: len(counts)]
    )


def test_minority_share_is_at_most_what_was_asked_and_the_rest_is_kept() -> None:
    data = _dataset([100, 300])
    out = with_minority_share(data, 0.2)  # class 0 is the rarest
    counts = np.bincount(out.train_labels)
    assert counts[1] == 300
    assert counts[0] == 75  # 75 / 375 = 20%
    assert counts[0] / counts.sum() <= 0.2
    assert np.array_equal(out.test_labels, data.test_labels)
    kept = out.train_images[out.train_labels == 0]
    assert len({int(i[0, 0]) for i in kept}) == 75  # distinct frames, no repeats


def test_minority_share_of_a_chosen_class_and_refusals() -> None:
    data = _dataset([100, 100, 100])
    out = with_minority_share(data, 0.02, minority=2)
    counts = np.bincount(out.train_labels, minlength=3)
    assert counts.tolist() == [100, 100, 4]
    with pytest.raises(ValueError, match="less"):
        with_minority_share(data, 0.5, minority=0)
    with pytest.raises(ValueError, match="no frame"):
        with_minority_share(data, 0.001, minority=0)


def test_video_bursts_are_consecutive_near_copies() -> None:
    images = np.full((3, 8, 8), 100, dtype=np.uint8)
    frames, source = video_bursts(images, burst=4)
    assert frames.shape == (12, 8, 8)
    assert source.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert np.abs(frames.astype(float) - 100).mean() < 10
