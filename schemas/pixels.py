"""How pixels become model input: the executable half of the model contract.

The scorer and the trainer both call ``image_to_input`` so that a frame is
seen the same way at serving and at training time: converted to L or RGB per
``spec.channels``, resized to ``spec.input_size`` with bilinear filtering, and
normalized as ``(x / 255 - mean) / std`` into float32 C x H x W.
"""

import numpy as np
from PIL import Image

from schemas.model_spec import ModelSpec

_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def image_to_input(image: Image.Image, spec: ModelSpec) -> np.ndarray:
    """A decoded image as model input (float32, C x H x W)."""
    return normalize(image_pixels(image, spec), spec)


def image_pixels(image: Image.Image, spec: ModelSpec) -> np.ndarray:
    """A decoded image converted and resized to the input: uint8 H x W (x C), before
    :func:`normalize` (the scorer normalizes a whole batch at once, :func:`normalize_batch`)."""
    height, width = spec.input_size
    image = to_mode(image, "L" if spec.channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image)


def normalize(pixels: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """uint8 H x W (x C) pixels at the input size → normalized float32 C x H x W."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return normalize_batch(pixels[None], spec)[0]


def normalize_batch(pixels: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """uint8 N x H x W x C pixels at the input size → normalized float32 N x C x H x W,
    each frame exactly as :func:`normalize` makes it."""
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    out = np.empty((len(pixels), spec.channels, *pixels.shape[1:3]), dtype=np.float32)
    np.multiply(pixels.transpose(0, 3, 1, 2), (1.0 / (255.0 * std))[:, None, None], out=out)
    out -= (mean / std)[:, None, None]
    return out


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Converts to L or RGB; 16-bit images (common for X-rays) keep their contrast."""
    if image.mode == mode:
        return image
    if image.mode in _SIXTEEN_BIT:
        wide = np.asarray(image, dtype=np.uint16)
        image = Image.fromarray((wide >> 8).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow warns when converting these straight to RGB
    return image.convert(mode)
