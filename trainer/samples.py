"""Labeled frames as training samples, preprocessed exactly as the scorer does.

A ``Sample`` holds the model input already normalized per the model spec
(``schemas.pixels.image_to_input``, the same function the scorer calls), so a
frame is seen the same way at training and at serving time.
"""

import io
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from schemas.model_spec import ModelSpec
from schemas.pixels import image_pixels, normalize, normalize_batch
from trainer.errors import SampleError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One labeled frame.

    Attributes:
        frame_id: the frame's id, unique across the stream.
        source: the model's input (float32 C x H x W) or, with ``spec``, its uint8
            pixels (H x W (x C)) that :attr:`inputs` normalizes when asked.
        label: the class index in ``spec.classes``.
        spec: the preprocessing of ``source`` when it holds pixels; None for inputs.
    """

    frame_id: str
    source: np.ndarray
    label: int
    spec: ModelSpec | None = None

    @property
    def inputs(self) -> np.ndarray:
        """float32 C x H x W, preprocessed per the model spec. A round's samples keep
        pixels and are normalized a batch at a time, so the float inputs of every label
        never exist at once (4 times the pixels' bytes)."""
        return self.source if self.spec is None else normalize(self.source, self.spec)


def decode_sample(frame_id: str, image_bytes: bytes, label_index: int, spec: ModelSpec) -> Sample:
    """Decodes an encoded image (JPEG, PNG, ...) into a training sample.

    Raises:
        SampleError: the bytes are not an image Pillow can decode, or the label
            index is not a class of ``spec``.
    """
    _check_label(frame_id, label_index, spec)
    inputs = decode_inputs(frame_id, image_bytes, spec)
    return Sample(frame_id=frame_id, source=inputs, label=int(label_index))


def decode_inputs(frame_id: str, image_bytes: bytes, spec: ModelSpec) -> np.ndarray:
    """Decodes an encoded image into the model input of ``spec`` (C x H x W float32).

    Raises:
        SampleError: the bytes are not an image Pillow can decode.
    """
    return normalize(decode_pixels(frame_id, image_bytes, spec), spec)


def decode_pixels(frame_id: str, image_bytes: bytes, spec: ModelSpec) -> np.ndarray:
    """Decodes an encoded image into ``spec``'s pixels before normalization (uint8
    H x W (x C), a quarter of the input's bytes; ``schemas.pixels.normalize`` finishes it).

    Raises:
        SampleError: the bytes are not an image Pillow can decode.
    """
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            image.load()
            return image_pixels(image, spec)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # Pillow reports truncated or foreign bytes as OSError (UnidentifiedImageError)
        # and some corrupt headers as ValueError or SyntaxError.
        raise SampleError(f"frame {frame_id}: cannot decode image: {exc}") from exc


def _check_label(frame_id: str, label_index: int, spec: ModelSpec) -> None:
    if not 0 <= label_index < len(spec.classes):
        raise SampleError(
            f"frame {frame_id}: label index {label_index} is not one of {len(spec.classes)} classes"
        )


class SampleCache:
    """Decoded pixels by frame id, so that a frame's image is read and decoded once.

    A frame's image never changes (the store keeps the first request of a
    frame id); only its label may, and a sample takes the label it is asked
    for. Frames that cannot be decoded are remembered as such, so they are not
    read again either. The pixels follow the size and channels of the spec they
    were first decoded for, which a model lineage never changes.

    The cache keeps the uint8 pixels, not the float32 inputs: it lives as long as the
    trainer and holds every label's frame, so this is a quarter of the memory (150 KB
    instead of 602 KB a frame at 224 x 224 RGB). Its samples share those pixels and
    are normalized as their inputs are asked for, exactly as ``decode_inputs`` would
    make them.
    """

    def __init__(self) -> None:
        self._pixels: dict[str, np.ndarray | None] = {}

    def samples(
        self,
        labeled: Sequence[tuple[str, int]],
        spec: ModelSpec,
        read_images: Callable[[list[str]], Mapping[str, bytes]],
    ) -> list[Sample]:
        """Samples of ``(frame id, label index)`` pairs, in their order.

        Args:
            labeled: the frames and their labels (indices into ``spec.classes``).
            spec: the model spec whose preprocessing decodes new frames.
            read_images: returns the encoded images of the given frame ids; it
                is called once, with the frames not decoded before.

        Returns:
            A sample per frame that decodes; the cache keeps only these frames
            (and those that failed), so it holds what the latest call used.

        Raises:
            SampleError: a label index is not a class of ``spec``.
        """
        for frame_id, label_index in labeled:
            _check_label(frame_id, label_index, spec)
        missing = [frame_id for frame_id, _ in labeled if frame_id not in self._pixels]
        images = read_images(missing) if missing else {}
        for frame_id in missing:
            if frame_id in images:
                self._pixels[frame_id] = self._decode(frame_id, images[frame_id], spec)
        wanted = {frame_id for frame_id, _ in labeled}
        self._pixels = {f: pixels for f, pixels in self._pixels.items() if f in wanted}
        return [
            Sample(frame_id, pixels, label_index, spec)
            for frame_id, label_index in labeled
            if (pixels := self._pixels.get(frame_id)) is not None
        ]

    @property
    def nbytes(self) -> int:
        """Bytes of the pixels held."""
        return sum(p.nbytes for p in self._pixels.values() if p is not None)

    @staticmethod
    def _decode(frame_id: str, image: bytes, spec: ModelSpec) -> np.ndarray | None:
        try:
            return decode_pixels(frame_id, image, spec)
        except SampleError as error:
            log.warning("skipping frame %s: %s", frame_id, error)
            return None


def stack(samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(inputs N x C x H x W float32, labels N int64)``.

    Raises:
        ValueError: no samples, or samples of different shapes.
    """
    if not samples:
        raise ValueError("cannot stack zero samples")
    spec = samples[0].spec
    if spec is not None and all(s.spec is spec for s in samples):  # pixels: one pass
        pixels = np.stack([s.source for s in samples])
        inputs = normalize_batch(pixels if pixels.ndim == 4 else pixels[..., None], spec)
    else:
        inputs = np.stack([s.inputs for s in samples]).astype(np.float32, copy=False)
    labels = np.fromiter((s.label for s in samples), dtype=np.int64, count=len(samples))
    return inputs, labels
