"""JPEG batches through NVIDIA DALI (``WINNOW_SCORER_DECODER=dali``): the same model input
as the CPU path within a few levels, the same dead letters, and the CPU path for whatever
DALI does not take. DALI's CPU backend stands in for the GPU here; the GPU test runs where
CUDA is usable (``scripts/gpu-check.sh``)."""

import io
import logging
from typing import Any

import numpy as np
import pytest
from PIL import Image

from schemas.dead_letter import DeadLetter
from schemas.model_spec import ModelSpec
from service.config import ScorerSettings
from service.model.inference import CPU, CUDA, OnnxModel, cuda_usable
from service.pipeline import dali_decode
from service.pipeline.dali_decode import DaliBatchDecoder, batch_decoder
from service.pipeline.decode import BatchDecoder, Item, prepare_batch
from service.pipeline.scorer import Scorer
from tests.kafka_helpers import committed_offsets, produce, read_json
from tests.service.pipeline.test_decode import LIMITS, _spec

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (winnow-stream[dali])")

RGB_224 = _spec(3, (224, 224))


def _jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def camera() -> list[bytes]:
    """JPEG frames at the sizes cameras send: crops of 640x427 and 640x480, 1280x720."""
    from winnow.bench.throughput import camera_frames

    return [  # other seeds: the sized frames would be the first ones resized
        *camera_frames(4),
        *camera_frames(3, seed=1, size=(640, 480)),
        *camera_frames(2, seed=2, size=(1280, 720)),
    ]


def _levels(a: np.ndarray, b: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """|a - b| in 0-255 pixel levels (undoing the normalization's std)."""
    return np.abs(a - b) * (np.asarray(spec.std)[None, :, None, None] * 255.0)


def _items(frames: list[bytes]) -> list[Item]:
    return [(frame, "image/jpeg") for frame in frames]


@pytest.mark.parametrize("spec", [RGB_224, _spec(1, (64, 64))], ids=["rgb-224", "grey-64"])
def test_dali_input_agrees_with_the_cpu_path_within_a_few_levels(
    camera: list[bytes], spec: ModelSpec
) -> None:
    """Fails where the pipeline's colour order, layout, normalization or resize differ from
    the model contract's (a swapped mean and std, BGR, HWC, a crop instead of a squash)."""
    decoder = DaliBatchDecoder(LIMITS, 1, 16, device="cpu")
    inputs, good, poison = decoder.decode_now(_items(camera), spec)
    reference, _, _ = prepare_batch(_items(camera), spec, LIMITS)
    assert good == list(range(len(camera))) and poison == [] and decoder.fallbacks == 0
    assert inputs.shape == reference.shape and inputs.dtype == np.float32
    levels = _levels(inputs, reference, spec)
    # measured: mean 0.1 to 1.1 levels, 99th percentile 1 to 9 (the CPU path decodes large
    # frames at a reduced DCT scale before Pillow's resize, DALI decodes them whole)
    assert levels.mean() < 2.0
    assert np.percentile(levels, 99) < 14.0


def test_dead_letter_reasons_and_pngs_are_the_cpu_paths(camera: list[bytes]) -> None:
    """A frame's fate does not depend on the decoder: poison gets the CPU path's reason at its
    index, a PNG is decoded by the CPU path bit for bit, a truncated JPEG is never half-decoded
    by DALI."""
    photo = np.asarray(Image.open(io.BytesIO(camera[0])))
    png = io.BytesIO()
    Image.fromarray(photo[:50, :60]).save(png, format="PNG")
    items: list[Item] = [
        (camera[0], "image/jpeg"),
        (b"", None),
        (png.getvalue(), "image/png"),
        (camera[1][:-2000], "image/jpeg"),  # truncated: no end-of-image marker
        (camera[2], None),
        (b"GIF89a" + b"\x00" * 20, None),
        (camera[3], "image/gif"),
        (camera[4], "image/jpeg"),
    ]
    decoder = DaliBatchDecoder(LIMITS, 1, 16, device="cpu")
    inputs, good, poison = decoder.decode_now(items, RGB_224)
    reference, ref_good, ref_poison = prepare_batch(items, RGB_224, LIMITS)
    assert good == ref_good == [0, 2, 4, 7]
    assert [(i, e.reason) for i, e in poison] == [(i, e.reason) for i, e in ref_poison]
    assert [(i, e.reason) for i, e in poison] == [
        (1, "empty"),
        (3, "truncated"),
        (5, "unsupported_type"),
        (6, "unsupported_type"),
    ]
    np.testing.assert_array_equal(inputs[1], reference[1])  # the PNG: the CPU path's own
    assert _levels(inputs, reference, RGB_224).mean() < 2.0


def _refused_by_dali(frame: bytes) -> bytes:
    """A JPEG with scan data and an end marker whose quantization table is gone: DALI fails
    the whole part on it; libjpeg-turbo calls it undecodable."""
    return frame.replace(b"\xff\xdb", b"\xff\xfe", 1)


def test_a_part_dali_refuses_is_decoded_by_the_cpu_path(
    camera: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """Fails where one broken frame costs the other frames of its part their decisions, or
    where the pipeline is not rebuilt after DALI gives up on it."""
    items = _items([camera[0], _refused_by_dali(camera[1]), camera[2]])
    decoder = DaliBatchDecoder(LIMITS, 1, 16, device="cpu")
    with caplog.at_level(logging.WARNING, logger=dali_decode.__name__):
        inputs, good, poison = decoder.decode_now(items, RGB_224)
    reference, ref_good, _ = prepare_batch(items, RGB_224, LIMITS)
    assert decoder.fallbacks == 1
    assert "DALI refused a part" in caplog.text and "decoders.image" in caplog.text
    assert good == ref_good == [0, 2]
    assert [(i, e.reason) for i, e in poison] == [(1, "undecodable")]
    np.testing.assert_array_equal(inputs, reference)  # decoded by the CPU path
    inputs, good, _ = decoder.decode_now(_items(camera[:3]), RGB_224)
    assert good == [0, 1, 2] and decoder.fallbacks == 1  # DALI again, on a new pipeline
    reference = prepare_batch(_items(camera[:3]), RGB_224, LIMITS)[0]
    assert _levels(inputs, reference, RGB_224).mean() < 2.0


def test_parts_larger_than_the_pipeline_keep_the_frames_order(camera: list[bytes]) -> None:
    """Fails where frames of a batch split into pipeline-sized parts (or around a PNG) come
    back in another order: each row must be nearest to its own frame's CPU input."""
    frames = camera + camera[:3]
    png = io.BytesIO()
    upside_down = np.asarray(Image.open(io.BytesIO(camera[5])))[::-1]  # an image of its own
    Image.fromarray(np.ascontiguousarray(upside_down)).save(png, format="PNG")
    items = [*_items(frames[:5]), (png.getvalue(), "image/png"), *_items(frames[5:])]
    decoder = DaliBatchDecoder(LIMITS, 1, 4, device="cpu")
    inputs, good, _ = decoder.decode_now(items, RGB_224)
    reference, _, _ = prepare_batch(items, RGB_224, LIMITS)
    assert good == list(range(len(items)))
    distances = np.abs(inputs[:, None] - reference[None]).mean(axis=(2, 3, 4))
    # a frame and its copy later in the batch are the same image
    nearest = distances.argmin(axis=1)
    same = [
        np.flatnonzero((reference == reference[i]).all(axis=(1, 2, 3))) for i in range(len(items))
    ]
    assert all(nearest[i] in same[i] for i in range(len(items)))


def test_the_setting_picks_the_decoder(caplog: pytest.LogCaptureFixture) -> None:
    assert isinstance(batch_decoder(ScorerSettings(), LIMITS, CPU), BatchDecoder)
    with caplog.at_level(logging.WARNING, logger=dali_decode.__name__):
        fallback = batch_decoder(ScorerSettings(decoder="dali"), LIMITS, CPU)
    assert isinstance(fallback, BatchDecoder)
    assert "needs the model on CUDA" in caplog.text
    tested = batch_decoder(ScorerSettings(decoder="dali-cpu"), LIMITS, CPU)
    assert isinstance(tested, DaliBatchDecoder)
    tested.close()


def test_without_dali_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.errors import ConfigError

    monkeypatch.setattr(dali_decode, "dali_available", lambda: (False, "install winnow[dali]"))
    with pytest.raises(ConfigError, match="install winnow"):
        DaliBatchDecoder(LIMITS, 1, 4, device="cpu")


def _digit_jpegs(count: int) -> list[bytes]:
    from sklearn.datasets import load_digits

    images = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
    return [
        _jpeg(np.kron(image, np.ones((4, 4), np.uint8)), quality=95) for image in images[:count]
    ]


async def test_the_scorer_decides_every_jpeg_frame_through_dali(
    scorer_settings: Any, digits_model_path: Any, winnow_topics: Any
) -> None:
    """End to end on the real broker with ``decoder=dali-cpu``: every good frame gets a
    prediction whose probabilities are those of the CPU path's input within a small
    tolerance, broken frames are dead-lettered with the CPU path's reasons, and every
    offset is committed."""
    settings = scorer_settings(name="random", budget=0.1)
    tuned = settings.scorer.model_copy(update={"decoder": "dali-cpu"})
    settings = settings.model_copy(update={"scorer": tuned})
    frames = _digit_jpegs(40)
    records: list[tuple[bytes, bytes | None, list[tuple[str, bytes]]]] = [
        (b"cam", frame, [("frame-id", f"f{i}".encode()), ("content-type", b"image/jpeg")])
        for i, frame in enumerate(frames)
    ]
    records.insert(10, (b"cam", frames[0][:300], [("frame-id", b"truncated")]))
    records.insert(20, (b"cam", _refused_by_dali(frames[1]), [("frame-id", b"no-tables")]))
    await produce(settings.kafka, winnow_topics.frames, records)
    model = OnnxModel.load(digits_model_path, device="cpu")
    async with Scorer(settings, model):
        predictions = await read_json(
            settings.kafka, winnow_topics.predictions, lambda out: len(out) >= len(frames)
        )
        letters = await read_json(
            settings.kafka, winnow_topics.dead_letter, lambda out: len(out) >= 2
        )
    by_id = {p["frame_id"]: p for p in predictions}
    assert set(by_id) == {f"f{i}" for i in range(len(frames))}
    reasons = {DeadLetter.model_validate(d).headers["frame-id"]: d["reason"] for d in letters}
    assert reasons == {"truncated": "truncated", "no-tables": "undecodable"}
    reference, _, _ = prepare_batch(_items(frames), model.spec, LIMITS)
    probabilities, _ = model.run(reference)
    classes = model.spec.classes
    served = np.array([[by_id[f"f{i}"]["probabilities"][c] for c in classes] for i in range(40)])
    assert np.abs(served - probabilities).max() < 0.05
    # The untrained model's outputs barely depend on the input (another frame's input is
    # 0.002 away, zeros 0.008), so what shows that each frame was scored on its own input is
    # agreement far closer than that: with DALI's decode of it, or, in the part the refused
    # frame sent to the CPU path (at most a batch), with the CPU path's.
    decoded, _, _ = DaliBatchDecoder(LIMITS, 1, 16, device="cpu").decode_now(
        _items(frames), model.spec
    )
    by_dali = np.abs(served - model.run(decoded)[0]).max(axis=1) < 1e-5
    by_cpu = np.abs(served - probabilities).max(axis=1) < 1e-5
    assert (by_dali | by_cpu).all()
    assert by_dali.sum() >= len(frames) - settings.scorer.max_batch_size
    committed = await committed_offsets(
        settings.kafka, winnow_topics.frames, settings.scorer.group_id
    )
    assert sum(committed.values()) == len(records)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_usable()[0], reason="no usable CUDA device")
def test_on_the_gpu_like_on_the_cpu(camera: list[bytes]) -> None:
    """nvJPEG and DALI's GPU resize give the CPU backend's input within a few levels."""
    gpu = batch_decoder(ScorerSettings(decoder="dali"), LIMITS, CUDA)
    assert isinstance(gpu, DaliBatchDecoder)
    inputs, good, _ = gpu.decode_now(_items(camera), RGB_224)
    on_cpu, _, _ = DaliBatchDecoder(LIMITS, 1, 16, device="cpu").decode_now(_items(camera), RGB_224)
    assert good == list(range(len(camera))) and gpu.fallbacks == 0
    assert _levels(inputs, on_cpu, RGB_224).mean() < 2.0
    gpu.close()
