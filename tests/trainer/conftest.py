"""Fixtures of the trainer's tests."""

import io

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def digits() -> tuple[list[bytes], np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * (255 / 16)).astype(np.uint8)
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs, data.target
