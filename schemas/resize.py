"""Pillow's bilinear resize of small 8-bit frames, for a whole batch at once, pixel for pixel.

The model contract resizes with Pillow's ``BILINEAR`` filter (``schemas.pixels``). For
small frames (the 8x8 digits, 28x28 MedMNIST images) Pillow's fixed cost per image is
most of the work: wrapping the array in an image, resizing and reading it back took 14 µs
a digits frame (8x8 to 16x16) on this project's 2-core machine, against under 2 µs a
frame here for a batch of 16. Both passes are the same arithmetic as Pillow's
``Resample.c``: each output pixel is a sum of input pixels times fixed-point weights of
22 fractional bits (computed as Pillow computes them, in double precision, then
rounded), rounded and clipped to 8 bits after each pass, the horizontal pass first.
Here each pass is one matrix product with a dense weight matrix, in float64, where
every product and sum of these integers is exact.

Pillow 13 runs the vertical pass first for some shrinking resizes (where the height
shrinks, observed; its choice is not documented), so a resize that shrinks the height
while it changes the width is left to Pillow (:func:`batch_resizable` says no), as is
any resize whose dense products would cost more than Pillow's sparse loops.
``tests/schemas/test_resize.py`` checks equality with the installed Pillow (13.0.0 here).
The project allows other Pillow versions, whose arithmetic or pass order may differ, so
the scorer also asks :func:`agrees_with_pillow` before it resizes a batch: once a process
for each pair of sizes, probe frames resized both ways must be equal, or that pair stays
Pillow's, with a warning.
"""

import functools
import logging

import numpy as np
import PIL
from PIL import Image

log = logging.getLogger(__name__)

PRECISION_BITS = 22
"""Fractional bits of Pillow's 8-bit resampling weights (``32 - 8 - 2``)."""
MAX_PRODUCTS = 1 << 18
"""Most multiply-adds per frame and channel of the dense passes; larger resizes go to
Pillow, whose loops touch only the few input pixels under each weight."""


def batch_resizable(source: tuple[int, int], target: tuple[int, int]) -> bool:
    """Whether :func:`resize_bilinear` resizes ``source`` (height, width) to ``target``
    as Pillow does, at a cost worth paying."""
    (height, width), (out_height, out_width) = source, target
    if min(height, width, out_height, out_width) < 1:
        return False
    if out_height < height and out_width != width:
        return False  # Pillow may run the vertical pass first here
    products = 0
    if out_width != width:
        products += height * width * out_width
    if out_height != height:
        products += out_height * height * out_width
    return products <= MAX_PRODUCTS


@functools.lru_cache(maxsize=256)
def agrees_with_pillow(source: tuple[int, int], target: tuple[int, int], channels: int) -> bool:
    """Whether :func:`resize_bilinear` gives the installed Pillow's pixels for this resize
    (``channels`` 1: grey, 3: RGB), on probe frames: random levels, black and white
    squares, and a ramp. Checked once a process for each pair of sizes (a few ms at
    most); False for a resize :func:`batch_resizable` refuses.
    """
    if not batch_resizable(source, target) or channels not in (1, 3):
        return False
    rng = np.random.default_rng(0)
    shape = (*source, channels) if channels == 3 else source
    noise = rng.integers(0, 256, (2, *shape), dtype=np.uint8)
    ramp = (np.arange(np.prod(shape)) % 256).astype(np.uint8).reshape(shape)
    probes = np.concatenate([noise, (noise[:1] // 128) * 255, ramp[None]])
    mode = "RGB" if channels == 3 else "L"
    height, width = target
    pillow = np.stack(
        [
            np.asarray(Image.fromarray(p, mode).resize((width, height), Image.Resampling.BILINEAR))
            for p in probes
        ]
    )
    if np.array_equal(resize_bilinear(probes, target), pillow):
        return True
    log.warning(
        "Pillow %s resizes %dx%d frames to %dx%d (%s) otherwise than schemas.resize; "
        "such frames are resized by Pillow one at a time (slower, the same pixels)",
        PIL.__version__,
        *source,
        *target,
        mode,
    )
    return False


def resize_bilinear(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Frames resized to ``size`` (height, width) as Pillow's ``BILINEAR`` resize would.

    Args:
        pixels: uint8 N x H x W (grey) or N x H x W x C frames of one size, one that
            :func:`batch_resizable` accepts.

    Returns:
        uint8 N x height x width (x C).
    """
    height, width = pixels.shape[1:3]
    if not batch_resizable((height, width), size):
        raise ValueError(f"a resize from {height}x{width} to {size[0]}x{size[1]} is Pillow's")
    out_height, out_width = size
    values = pixels.astype(np.float64)
    colour = values.ndim == 4
    if colour:
        values = values.transpose(0, 3, 1, 2)  # N x C x H x W: both passes on the last axes
    if out_width != width:
        values = _pass(values, _weights(width, out_width))
    if out_height != height:
        columns = np.swapaxes(values, -1, -2)  # the vertical pass along the last axis too
        values = np.swapaxes(_pass(columns, _weights(height, out_height)), -1, -2)
    if colour:
        values = values.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(values, dtype=np.uint8)


def _pass(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One pass along the last axis: the weighted sums, rounded and clipped to 8 bits."""
    sums = values @ weights.T
    sums += 1 << (PRECISION_BITS - 1)
    np.floor(sums / (1 << PRECISION_BITS), out=sums)
    return np.clip(sums, 0, 255, out=sums)


@functools.lru_cache(maxsize=64)
def _weights(size: int, out_size: int) -> np.ndarray:
    """The dense (out_size x size) matrix of Pillow's fixed-point bilinear weights."""
    scale = size / out_size
    filter_scale = max(scale, 1.0)
    support = filter_scale  # the bilinear filter's support is 1
    inverse = 1.0 / filter_scale
    weights = np.zeros((out_size, size))
    for out in range(out_size):
        center = (out + 0.5) * scale
        first = max(int(center - support + 0.5), 0)  # int() truncates as C's cast does
        count = min(int(center + support + 0.5), size) - first
        taps = [_bilinear((first + x - center + 0.5) * inverse) for x in range(count)]
        total = 0.0
        for tap in taps:
            total += tap
        for x, tap in enumerate(taps):
            share = tap / total if total != 0.0 else tap
            fixed = share * (1 << PRECISION_BITS)
            weights[out, first + x] = int(fixed - 0.5) if share < 0 else int(fixed + 0.5)
    weights.flags.writeable = False
    return weights


def _bilinear(x: float) -> float:
    x = -x if x < 0.0 else x
    return 1.0 - x if x < 1.0 else 0.0
