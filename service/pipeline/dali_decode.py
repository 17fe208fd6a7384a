"""JPEG batches decoded, resized and normalized by NVIDIA DALI (``WINNOW_SCORER_DECODER=dali``).

On a GPU host the scorer's CPUs are what limits it: on a 16-core H200 machine the CPU path
(:mod:`service.pipeline.decode`) spent 2.5 to 3.3 ms of CPU on each 640x480 frame, which
caps 16 cores at about 5,000 frames/s, while nvJPEG decoded 10,900 to 14,800 a second on
the GPU (issue 15). Here a batch's JPEGs go through one DALI pipeline: ``decoders.image``
on the ``mixed`` backend (Huffman decoding on the CPU's threads where nvJPEG's hardware
decoder is absent, the rest on the GPU), ``resize`` to the model input (linear, with
antialiasing when shrinking) and ``crop_mirror_normalize`` into float32 C x H x W with the
spec's mean and std. The batch comes back to host memory as the CPU path's does (ONNX
Runtime copies it to the GPU again; binding the device buffer to the session is the next
step, not built).

What DALI does not see keeps its meaning. Every frame first passes the CPU path's checks
that need no pixel (size, type, header, pixel count: the same dead-letter reasons); a
JPEG that does not end in its end-of-image marker, a PNG, or a batch DALI refuses
(a broken JPEG fails the whole batch) is decoded by the CPU path, which decides whether a
frame is poison. Pixels agree with the CPU path's within a few levels, not bit for bit:
the CPU path decodes a large JPEG at a reduced DCT scale before Pillow's bilinear resize,
DALI decodes it whole and resizes with antialiasing (the test bounds the difference).

``device="cpu"`` (``WINNOW_SCORER_DECODER=dali-cpu``) runs the same pipeline on DALI's
CPU backend: slower than the CPU path (one thread each, 64 frames, the 2-core machine
quiet, two runs: 3.7-4.6 against 2.1-2.8 ms a 640x427 frame, 5.7-6.4 against 1.7-2.1 at
640x480, 11.8-12.2 against 4.2 at 1920x1080), it exists so that the DALI path is tested
where there is no GPU.
"""

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np

from schemas.model_spec import ModelSpec
from service.config import ScorerSettings
from service.errors import ConfigError, PoisonRecord
from service.model.inference import CUDA
from service.pipeline.decode import BatchDecoder, DecodeLimits, Item, check_frame, prepare_batch

log = logging.getLogger(__name__)

DaliDevice = Literal["cpu", "gpu"]

_JPEG_END = b"\xff\xd9"
_JPEG_SCAN = b"\xff\xda"

Decoded = tuple[np.ndarray, list[int], list[tuple[int, PoisonRecord]]]


def batch_decoder(
    settings: ScorerSettings, limits: DecodeLimits, provider: str
) -> "BatchDecoder | DaliBatchDecoder":
    """The scorer's decoder for ``settings.decoder``, given the provider its model runs on.

    ``dali`` where the model does not run on CUDA falls back to the CPU path with a warning
    (an operator's setting shared by CPU and GPU nodes should not stop the CPU ones).

    Raises:
        ConfigError: DALI would be used and it is not installed.
    """
    threads = settings.decode_threads
    device = dali_device(settings.decoder, provider)
    if device is None:
        if settings.decoder == "dali":
            log.warning(
                "WINNOW_SCORER_DECODER=dali needs the model on CUDA, but it runs on %s; "
                "decoding on the CPU instead",
                provider,
            )
        return BatchDecoder(limits, threads)
    decoder = DaliBatchDecoder(limits, threads, settings.max_batch_size, device)
    log.info("frames decoded by DALI on the %s (%d threads)", device.upper(), threads)
    return decoder


def dali_device(decoder: str, provider: str) -> DaliDevice | None:
    """Where ``WINNOW_SCORER_DECODER=decoder`` runs DALI for a model on ``provider``; None
    where the CPU path decodes (``cpu``, or ``dali`` with the model off CUDA)."""
    if decoder == "dali-cpu":
        return "cpu"
    if decoder == "dali" and provider == CUDA:
        return "gpu"
    return None


def dali_available() -> tuple[bool, str]:
    """Whether NVIDIA DALI can be imported here, and if not, why."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        return False, (
            f"NVIDIA DALI is not installed ({exc}); install winnow-stream[dali] "
            "(nvidia-dali-cuda130, CUDA 13)"
        )
    return True, "ok"


class DaliBatchDecoder:
    """Decodes a batch as :func:`service.pipeline.decode.prepare_batch` does, its JPEGs
    through a DALI pipeline (see the module docstring).

    Args:
        limits: the decode limits.
        threads: DALI's CPU threads, and the CPU path's for what DALI does not take.
        max_batch: the largest part fed to the pipeline at once (the scorer's batch size).
        device: ``gpu`` (decode on CUDA device 0) or ``cpu`` (DALI's CPU backend).

    Raises:
        ConfigError: DALI is not installed.
    """

    def __init__(
        self, limits: DecodeLimits, threads: int, max_batch: int, device: DaliDevice = "gpu"
    ) -> None:
        usable, why = dali_available()
        if not usable:
            raise ConfigError(why)
        self._limits = limits
        self._threads = max(1, threads)
        self._max_batch = max(1, max_batch)
        self._device = device
        self._pipelines: dict[tuple[Any, ...], Any] = {}
        # One thread owns the pipelines (DALI's run is not for concurrent callers).
        self._pool = ThreadPoolExecutor(1, "winnow-decode")
        self._broken = False  # no pipeline could be built: the CPU path decodes everything
        self.fallbacks = 0
        """Parts DALI refused, decoded by the CPU path instead."""

    async def decode(self, items: Sequence[Item], spec: ModelSpec) -> Decoded:
        """As :func:`prepare_batch`: the inputs of the good frames in ``items`` order, their
        indices, and ``(index, error)`` for each poison frame."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.decode_now, items, spec)

    def decode_now(self, items: Sequence[Item], spec: ModelSpec) -> Decoded:
        """:meth:`decode` on the calling thread."""
        jpegs: list[int] = []
        others: list[int] = []
        poison: list[tuple[int, PoisonRecord]] = []
        for index, (value, content_type) in enumerate(items):
            try:
                fmt = check_frame(value, content_type, self._limits)
            except PoisonRecord as exc:
                poison.append((index, exc))
                continue
            assert value is not None  # check_frame refuses an empty value
            (jpegs if fmt == "JPEG" and _whole_jpeg(value) else others).append(index)
        parts: list[tuple[list[int], np.ndarray]] = []
        for start in range(0, len(jpegs), self._max_batch):
            chunk = jpegs[start : start + self._max_batch]
            inputs = self._run_pipeline([items[i][0] or b"" for i in chunk], spec)
            if inputs is None:
                others.extend(chunk)
            else:
                parts.append((chunk, inputs))
        if others:
            others.sort()
            cpu_inputs, cpu_good, cpu_poison = prepare_batch(
                [items[i] for i in others], spec, self._limits
            )
            parts.append(([others[i] for i in cpu_good], cpu_inputs))
            poison.extend((others[i], error) for i, error in cpu_poison)
        good = sorted(index for indices, _ in parts for index in indices)
        return _merge(parts, spec), good, sorted(poison, key=lambda pair: pair[0])

    def _run_pipeline(self, values: list[bytes], spec: ModelSpec) -> np.ndarray | None:
        """The pipeline's float32 N x C x H x W for ``values``; None where DALI refuses the
        part (the pipeline is then built afresh for the next one) or cannot build one (the
        CPU path decodes from then on)."""
        if self._broken:
            return None
        key = (spec.input_size, spec.channels, tuple(spec.mean), tuple(spec.std))
        pipe = self._pipelines.get(key)
        if pipe is None:
            try:
                pipe = self._pipelines[key] = build_pipeline(
                    spec, self._max_batch, self._threads, self._device
                )
            except Exception as exc:  # DALI raises RuntimeError and its own kinds
                self._broken = True
                log.error(
                    "DALI cannot build its pipeline on the %s (%s); the CPU path decodes "
                    "every frame from now on",
                    self._device.upper(),
                    _first_line(exc),
                )
                return None
        try:
            pipe.feed_input("frames", [np.frombuffer(value, dtype=np.uint8) for value in values])
            (out,) = pipe.run()
            inputs = (out.as_cpu() if self._device == "gpu" else out).as_array()
        except Exception as exc:  # a frame DALI cannot decode fails the whole part
            self._pipelines.pop(key, None)
            self._refused(f"{len(values)} JPEG frames: {_first_line(exc)}")
            return None
        expected = (len(values), spec.channels, *spec.input_size)
        if inputs.shape != expected or inputs.dtype != np.float32:
            self._refused(f"an output of {inputs.shape} {inputs.dtype}, not {expected} float32")
            return None
        return np.asarray(inputs)

    def _refused(self, what: str) -> None:
        """Counts a part DALI refused; logs the 1st, 2nd, 4th, 8th, ... (a stream of broken
        frames does not flood the log)."""
        self.fallbacks += 1
        if self.fallbacks & (self.fallbacks - 1) == 0:
            log.warning(
                "DALI refused a part (%d so far), the CPU path decoded it: %s",
                self.fallbacks,
                what,
            )

    def close(self) -> None:
        """Stops the thread and drops the pipelines; parts not yet started are dropped."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pipelines.clear()


def build_pipeline(spec: ModelSpec, max_batch: int, threads: int, device: DaliDevice) -> Any:
    """A built DALI pipeline: encoded frames fed as ``frames`` in, the model input out."""
    import nvidia.dali as dali

    # DALI's type stubs lack most operators and constants.
    fn: Any = dali.fn
    types: Any = dali.types
    pipeline_def: Any = dali.pipeline_def

    height, width = spec.input_size
    scale = 255.0
    mean = [m * scale for m in spec.mean]
    std = [s * scale for s in spec.std]
    colour = types.GRAY if spec.channels == 1 else types.RGB

    @pipeline_def(
        batch_size=max_batch,
        num_threads=threads,
        device_id=0 if device == "gpu" else None,
        exec_dynamic=True,
        prefetch_queue_depth=1,
    )
    def pipeline() -> Any:
        frames = fn.external_source(name="frames", dtype=types.UINT8)
        images = fn.decoders.image(
            frames, device="mixed" if device == "gpu" else "cpu", output_type=colour
        )
        images = fn.resize(images, resize_x=width, resize_y=height, interp_type=types.INTERP_LINEAR)
        return fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, mean=mean, std=std, output_layout="CHW"
        )

    pipe = pipeline()
    pipe.build()
    return pipe


def _whole_jpeg(value: bytes) -> bool:
    """Whether a JPEG has scan data and ends in its end-of-image marker. Anything else goes to
    the CPU path: a part with one frame DALI cannot decode fails whole, and the pipeline must
    then be built again."""
    return value.endswith(_JPEG_END) and value.find(_JPEG_SCAN, 2) > 0


def _first_line(exc: BaseException) -> str:
    """The informative part of an exception's text: for DALI's "Critical error in pipeline",
    the operator and what it encountered."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    operator = next((line for line in lines if line.startswith("Error in")), None)
    if operator is None or "encountered:" not in lines:
        return lines[0]
    after = lines[lines.index("encountered:") + 1 :]
    return f"{operator.rstrip(',')}: {after[0]}" if after else operator


def _merge(parts: list[tuple[list[int], np.ndarray]], spec: ModelSpec) -> np.ndarray:
    """The parts' rows in the order of their item indices."""
    if not parts:
        return np.empty((0, spec.channels, *spec.input_size), dtype=np.float32)
    indices = np.concatenate([np.asarray(part, dtype=np.intp) for part, _ in parts])
    return np.concatenate([inputs for _, inputs in parts])[np.argsort(indices, kind="stable")]
