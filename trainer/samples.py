"""Labeled frames as training samples, preprocessed exactly as the scorer does.

A ``Sample`` holds the model input already normalized per the model spec
(``schemas.pixels.image_to_input``, the same function the scorer calls), so a
frame is seen the same way at training and at serving time.
"""

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from schemas.model_spec import ModelSpec
from schemas.pixels import image_to_input
from trainer.errors import SampleError


@dataclass(frozen=True)
class Sample:
    """One labeled frame.

    Attributes:
        frame_id: the frame's id, unique across the stream.
        inputs: float32 C x H x W, preprocessed per the model spec.
        label: the class index in ``spec.classes``.
    """

    frame_id: str
    inputs: np.ndarray
    label: int


def decode_sample(frame_id: str, image_bytes: bytes, label_index: int, spec: ModelSpec) -> Sample:
    """Decodes an encoded image (JPEG, PNG, ...) into a training sample.

    Raises:
        SampleError: the bytes are not an image Pillow can decode, or the label
            index is not a class of ``spec``.
    """
    if not 0 <= label_index < len(spec.classes):
        raise SampleError(
            f"frame {frame_id}: label index {label_index} is not one of {len(spec.classes)} classes"
        )
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            image.load()
            inputs = image_to_input(image, spec)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # Pillow reports truncated or foreign bytes as OSError (UnidentifiedImageError)
        # and some corrupt headers as ValueError or SyntaxError.
        raise SampleError(f"frame {frame_id}: cannot decode image: {exc}") from exc
    return Sample(frame_id=frame_id, inputs=inputs, label=int(label_index))


def stack(samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(inputs N x C x H x W float32, labels N int64)``.

    Raises:
        ValueError: no samples, or samples of different shapes.
    """
    if not samples:
        raise ValueError("cannot stack zero samples")
    inputs = np.stack([s.inputs for s in samples]).astype(np.float32, copy=False)
    labels = np.fromiter((s.label for s in samples), dtype=np.int64, count=len(samples))
    return inputs, labels
