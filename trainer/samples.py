"""Labeled frames as training samples, preprocessed exactly as the scorer does.

A ``Sample`` holds the model input already normalized per the model spec
(``schemas.pixels.image_to_input``, the same function the scorer calls), so a
frame is seen the same way at training and at serving time.
"""

import io
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from PIL import Image

from schemas.model_spec import ModelSpec
from schemas.pixels import image_pixels, normalize, normalize_batch
from trainer.config import SAMPLE_CACHE_MB
from trainer.errors import SampleError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One labeled frame.

    Attributes:
        frame_id: the frame's id, unique across the stream.
        source: the model's input (float32 C x H x W) or, with ``spec``, its uint8
            pixels (H x W (x C)) that :attr:`inputs` normalizes when asked; None when
            ``cache`` has the pixels (see :class:`SampleCache`).
        label: the class index in ``spec.classes``.
        spec: the preprocessing of ``source`` when it holds pixels; None for inputs.
        cache: where the pixels are when ``source`` is None: it holds them, or reads the
            frame from the store and decodes it again.
    """

    frame_id: str
    source: np.ndarray | None
    label: int
    spec: ModelSpec | None = None
    cache: "SampleCache | None" = field(default=None, repr=False, compare=False)

    @property
    def data(self) -> np.ndarray:
        """``source``, or the pixels from ``cache``."""
        return arrays([self])[0]

    @property
    def inputs(self) -> np.ndarray:
        """float32 C x H x W, preprocessed per the model spec. A round's samples keep
        pixels and are normalized a batch at a time, so the float inputs of every label
        never exist at once (4 times the pixels' bytes)."""
        data = self.data
        return data if self.spec is None else normalize(data, self.spec)


def arrays(samples: Sequence[Sample]) -> list[np.ndarray]:
    """Each sample's :attr:`Sample.data`, those a cache has fetched in one call per cache.

    Raises:
        SampleError: a frame the cache no longer holds is gone from the store, or no
            longer decodes.
        ValueError: a sample has neither pixels nor a cache.
    """
    out: list[np.ndarray | None] = [s.source for s in samples]
    by_cache: dict[int, tuple[SampleCache, list[int]]] = {}
    for index, sample in enumerate(samples):
        if sample.source is None:
            if sample.cache is None:
                raise ValueError(f"sample {sample.frame_id} has neither pixels nor a cache")
            by_cache.setdefault(id(sample.cache), (sample.cache, []))[1].append(index)
    for cache, indices in by_cache.values():
        fetched = cache.pixels([samples[i].frame_id for i in indices])
        for index, pixels in zip(indices, fetched, strict=True):
            out[index] = pixels
    return cast(list[np.ndarray], out)  # every None was filled above


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


READ_BATCH = 500
"""Frames a cache reads from the store and decodes at a time on first sight."""


class SampleCache:
    """Decoded pixels by frame id up to a memory budget, so that a frame's image is
    read and decoded once while the budget lasts.

    A frame's image never changes (the store keeps the first request of a frame id);
    only its label may, and a sample takes the label it is asked for. Frames that cannot
    be decoded are remembered as such, so they are not read again either. The pixels
    follow the size and channels of the spec they were first decoded for, which a model
    lineage never changes. The cache keeps the uint8 pixels, not the float32 inputs (a
    quarter of the bytes), normalized as a sample's inputs are asked for, exactly as
    ``decode_inputs`` would make them.

    Why a budget: a round touches every labeled frame (the holdout and the replay
    candidates are drawn from all of them), so a cache without one grows with the labels,
    150 KB a label at 224 x 224 RGB, 1.5 GB every 10,000 labels, until the trainer meets
    its memory limit; restarted, its first round would decode them all again and meet it
    again. This one holds frames until ``budget_bytes`` is reached and keeps them; frames
    past it are read from the store and decoded again each time they are used. Its
    samples carry no pixels of their own (:attr:`Sample.cache`), so a round's samples
    hold no more than the cache and the batch in hand.

    Which frames: the first that fit. A round reads its frames in scans (the replay
    candidates, the holdout, each batch of training), and against scans keeping the first
    frames serves ``budget / total`` of the reads from memory, where evicting the least
    recently used would serve none once the frames outgrow the budget. A frame no longer
    asked for (its label dropped) leaves and makes room.

    Thread-safe: a round runs in a worker thread.
    """

    def __init__(self, budget_bytes: int = SAMPLE_CACHE_MB * 2**20) -> None:
        if budget_bytes < 0:
            raise ValueError(f"the sample cache's budget must be 0 or more, not {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.decoded_again = 0
        """Frames read and decoded again because the budget did not hold them, in all."""
        self._pixels: dict[str, np.ndarray] = {}
        self._held = 0
        self._decodes: set[str] = set()  # the frames asked for that decode, held or not
        self._failed: set[str] = set()
        self._read: Callable[[list[str]], Mapping[str, bytes]] | None = None
        self._spec: ModelSpec | None = None
        self._full_said = False
        self._lock = threading.Lock()

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
            read_images: returns the encoded images of the given frame ids; it is called
                with the frames not decoded before (:data:`READ_BATCH` at a time), and
                later with those the budget did not hold, when they are used.

        Returns:
            A sample per frame that decodes, its pixels in this cache. The cache keeps
            only these frames (and those that failed), so it holds what the latest call
            used.

        Raises:
            SampleError: a label index is not a class of ``spec``.
        """
        for frame_id, label_index in labeled:
            _check_label(frame_id, label_index, spec)
        wanted = dict.fromkeys(frame_id for frame_id, _ in labeled)
        with self._lock:
            self._read, self._spec = read_images, spec
            for frame_id in [f for f in self._pixels if f not in wanted]:
                self._held -= self._pixels.pop(frame_id).nbytes
            self._decodes.intersection_update(wanted)
            self._failed.intersection_update(wanted)
            new = [f for f in wanted if f not in self._decodes and f not in self._failed]
            for start in range(0, len(new), READ_BATCH):
                chunk = new[start : start + READ_BATCH]
                images = read_images(chunk)
                for frame_id in chunk:
                    if frame_id not in images:
                        continue  # not stored (yet): asked for again next time
                    pixels = self._decode(frame_id, images[frame_id], spec)
                    if pixels is None:
                        self._failed.add(frame_id)
                    else:
                        self._decodes.add(frame_id)
                        self._hold(frame_id, pixels)
            decodes = set(self._decodes)
        return [
            Sample(frame_id, None, label_index, spec, cache=self)
            for frame_id, label_index in labeled
            if frame_id in decodes
        ]

    def pixels(self, frame_ids: Sequence[str]) -> list[np.ndarray]:
        """The pixels of ``frame_ids`` (frames a :meth:`samples` call gave), in order:
        held ones from memory, the others read from the store and decoded again (and held
        where the budget has room).

        Raises:
            SampleError: a frame is no longer in the store, or no longer decodes.
        """
        with self._lock:
            missing = [f for f in dict.fromkeys(frame_ids) if f not in self._pixels]
            again: dict[str, np.ndarray] = {}
            if missing:
                if self._read is None or self._spec is None:
                    raise SampleError(f"frame {missing[0]}: the sample cache never decoded it")
                images = self._read(missing)
                for frame_id in missing:
                    if frame_id not in images:
                        raise SampleError(f"frame {frame_id}: its image is gone from the store")
                    pixels = self._decode(frame_id, images[frame_id], self._spec)
                    if pixels is None:
                        raise SampleError(f"frame {frame_id}: its image no longer decodes")
                    again[frame_id] = pixels
                    if frame_id in self._decodes:
                        self._hold(frame_id, pixels)
                self.decoded_again += len(missing)
            return [self._pixels[f] if f in self._pixels else again[f] for f in frame_ids]

    @property
    def nbytes(self) -> int:
        """Bytes of the pixels held."""
        return self._held

    @property
    def frames(self) -> tuple[int, int]:
        """(frames held, frames known to decode): the second is the last call's."""
        with self._lock:
            return len(self._pixels), len(self._decodes)

    def _hold(self, frame_id: str, pixels: np.ndarray) -> None:
        if self._held + pixels.nbytes <= self.budget_bytes:
            self._pixels[frame_id] = pixels
            self._held += pixels.nbytes
        elif not self._full_said:
            self._full_said = True
            log.warning(
                "the sample cache is full (%.0f MB, %d frames): frames past it are read from "
                "the store and decoded again each time a round uses them; "
                "WINNOW_TRAINER_SAMPLE_CACHE_MB raises the budget",
                self._held / 2**20,
                len(self._pixels),
            )

    @staticmethod
    def _decode(frame_id: str, image: bytes, spec: ModelSpec) -> np.ndarray | None:
        try:
            return decode_pixels(frame_id, image, spec)
        except SampleError as error:
            log.warning("skipping frame %s: %s", frame_id, error)
            return None


def inputs_of(samples: Sequence[Sample]) -> list[np.ndarray]:
    """Each sample's :attr:`Sample.inputs`, the pixels a cache has fetched in one call."""
    return [
        d if s.spec is None else normalize(d, s.spec)
        for s, d in zip(samples, arrays(samples), strict=True)
    ]


def stack(samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(inputs N x C x H x W float32, labels N int64)``.

    Raises:
        ValueError: no samples, or samples of different shapes.
    """
    if not samples:
        raise ValueError("cannot stack zero samples")
    spec = samples[0].spec
    if spec is not None and all(s.spec is spec for s in samples):  # pixels: one pass
        pixels = np.stack(arrays(samples))
        inputs = normalize_batch(pixels if pixels.ndim == 4 else pixels[..., None], spec)
    else:
        inputs = np.stack(inputs_of(samples)).astype(np.float32, copy=False)
    labels = np.fromiter((s.label for s in samples), dtype=np.int64, count=len(samples))
    return inputs, labels
