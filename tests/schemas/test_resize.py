"""The batch resize of small frames against the installed Pillow, pixel for pixel."""

import logging

import numpy as np
import PIL
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from schemas import resize
from schemas.resize import agrees_with_pillow, batch_resizable, resize_bilinear


def _pillow(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    mode = "L" if frames.ndim == 3 else "RGB"
    height, width = size
    return np.stack(
        [
            np.asarray(Image.fromarray(f, mode).resize((width, height), Image.Resampling.BILINEAR))
            for f in frames
        ]
    )


sides = st.integers(1, 48)


@settings(max_examples=300, deadline=None)
@given(
    source=st.tuples(sides, sides),
    target=st.tuples(sides, sides),
    colour=st.booleans(),
    extremes=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_resize_it_accepts_is_pillows_pixel_for_pixel(
    source: tuple[int, int],
    target: tuple[int, int],
    colour: bool,
    extremes: bool,
    seed: int,
) -> None:
    """The failure it catches: frames the scorer resizes in a batch that differ, even by one
    level, from what Pillow (and so the trainer, ``schemas.pixels``) makes of them."""
    if not batch_resizable(source, target):
        with pytest.raises(ValueError, match="is Pillow's"):
            resize_bilinear(np.zeros((1, *source), dtype=np.uint8), target)
        return
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (3, *source, *((3,) if colour else ())), dtype=np.uint8)
    if extremes:  # black and white edges: where rounding and clipping show
        frames = (frames // 128) * 255
    got = resize_bilinear(frames, target)
    assert got.dtype == np.uint8 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, _pillow(frames, target))


@pytest.mark.parametrize(
    ("source", "target"),
    [((8, 8), (16, 16)), ((28, 28), (32, 32)), ((28, 28), (16, 16)), ((40, 30), (40, 12))],
)
def test_the_resizes_of_small_datasets_are_taken(
    source: tuple[int, int], target: tuple[int, int]
) -> None:
    """Digits (8x8) and MedMNIST (28x28) into the small CNN: the cases this is for; the
    last two shrink, one axis at a time or both at once."""
    assert batch_resizable(source, target) == (source != (28, 28) or target != (16, 16))


def test_large_or_ambiguous_resizes_are_left_to_pillow() -> None:
    assert not batch_resizable((480, 640), (224, 224))  # dense products too costly
    assert not batch_resizable((64, 48), (32, 64))  # shrinks the height, changes the width
    assert batch_resizable((32, 48), (64, 24))  # grows the height: horizontal pass first
    assert not batch_resizable((0, 8), (16, 16))


@pytest.mark.parametrize("channels", [1, 3])
def test_the_installed_pillow_agrees_on_the_small_datasets_resizes(channels: int) -> None:
    assert agrees_with_pillow((8, 8), (16, 16), channels)
    assert agrees_with_pillow((28, 28), (32, 32), channels)
    assert not agrees_with_pillow((64, 48), (32, 64), channels)  # refused by its sizes
    assert not agrees_with_pillow((8, 8), (16, 16), 4)  # only grey and RGB


def test_a_pillow_that_rounds_otherwise_is_found_and_named(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The failure it catches: another Pillow version whose arithmetic differs by one level
    somewhere (simulated: one weight off by one unit of 2^-22 on this side) while the scorer
    keeps resizing batches its own way."""
    original = resize._weights

    def off_by_one(size: int, out_size: int) -> np.ndarray:
        weights = original(size, out_size).copy()
        weights[out_size // 2, np.argmax(weights[out_size // 2])] += 1 << 20
        return weights

    monkeypatch.setattr(resize, "_weights", off_by_one)
    agrees_with_pillow.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="schemas.resize"):
            assert not agrees_with_pillow((8, 8), (16, 16), 1)
            assert not agrees_with_pillow((8, 8), (16, 16), 1)  # asked again: no new line
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "8x8 frames to 16x16 (L)" in lines[0], lines
        assert PIL.__version__ in lines[0]
    finally:
        agrees_with_pillow.cache_clear()
