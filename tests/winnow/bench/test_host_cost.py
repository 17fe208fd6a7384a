"""The scorer's host-cost measurement: per-thread CPU time, the stage profiler, the split."""

import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from schemas.model_spec import ModelSpec
from service.pipeline.decode import DecodeLimits, prepare_batch
from winnow.bench.host_cost import STAGES, CpuClock, StageSampler, classify, stage_breakdown
from winnow.datasets import encode_png


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_cpu_clock_keeps_the_time_of_threads_that_ended() -> None:
    start = CpuClock.snapshot()
    worker = threading.Thread(target=_spin, args=(0.2,))
    worker.start()
    worker.join()
    end = CpuClock.snapshot()
    assert end.process_s - start.process_s >= 0.19


def test_cpu_clock_per_live_thread() -> None:
    # The worker spins a fixed amount of its own CPU time between the snapshots, however
    # long a busy machine takes to give it that (a wall-clock window got 0.04 s of CPU in CI).
    go, spun, stop = threading.Event(), threading.Event(), threading.Event()

    def work() -> None:
        go.wait()
        _spin(0.2)
        spun.set()
        stop.wait()  # alive, and idle, at the second snapshot

    worker = threading.Thread(target=work)
    sleeper = threading.Thread(target=stop.wait)
    worker.start()
    sleeper.start()
    try:
        start = CpuClock.snapshot()
        go.set()
        assert spun.wait(120), "the worker did not get 0.2 s of CPU within 120 s"
        end = CpuClock.snapshot()
    finally:
        stop.set()
        worker.join()
        sleeper.join()
    per_thread = CpuClock.per_thread(start, end)
    assert 0.17 <= per_thread[worker.native_id] <= 0.5
    assert per_thread[sleeper.native_id] < 0.01


def test_classify_names_idle_waits_and_stages() -> None:
    event = threading.Event()
    waiter = threading.Thread(target=event.wait)
    waiter.start()
    time.sleep(0.05)
    try:
        assert classify(sys._current_frames()[waiter.ident]) == "idle"  # type: ignore[index]
    finally:
        event.set()
        waiter.join()
    assert classify(sys._getframe()) == "other"  # a test is no stage of the scorer


def test_sampler_finds_a_thread_decoding() -> None:
    spec = ModelSpec(
        version="v",
        arch="small-cnn",
        classes=["a", "b"],
        input_size=(16, 16),
        channels=1,
        mean=[0.5],
        std=[0.25],
        embedding_dim=8,
    )
    items = [(encode_png(np.full((64, 64), i, np.uint8)), "image/png") for i in range(32)]
    limits = DecodeLimits(max_bytes=1 << 20, max_pixels=1 << 20)
    stop = threading.Event()

    def decode_loop() -> None:
        while not stop.is_set():
            prepare_batch(items, spec, limits)

    decoder = threading.Thread(target=decode_loop)
    sampler = StageSampler(0.001)
    sampler.start()
    decoder.start()
    sampler.resume()
    deadline = time.monotonic() + 10  # samples, not wall time: the decoder holds the GIL
    while sampler.samples <= 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    sampler.pause()
    stop.set()
    decoder.join()
    sampler.stop()
    counts = sampler.counts[decoder.native_id]  # type: ignore[index]
    assert sampler.samples > 20
    assert counts["decode"] > 0.8 * sum(counts.values()), counts


def test_stage_breakdown_shares_each_threads_time_by_its_busy_samples() -> None:
    main = threading.get_native_id()
    counts = {main: Counter(decode=30, deliver=10, idle=60)}
    native = 10**9  # no Python thread has it: onnxruntime's pool
    stages = stage_breakdown({main: 0.4, native: 0.2}, counts, process_s=0.7)
    assert list(stages) == list(STAGES)
    assert stages["decode"] == pytest.approx(0.3)
    assert stages["deliver"] == pytest.approx(0.1)
    assert stages["infer"] == pytest.approx(0.2)
    assert stages["other"] == pytest.approx(0.1)  # a thread that ended
    assert sum(stages.values()) == pytest.approx(0.7)


def test_dalis_own_threads_count_as_decode() -> None:
    """NVIDIA DALI decodes in native threads of its own (``[DALI]...``): counted as
    onnxruntime's, the decoder's cost would show up as inference."""
    pytest.importorskip("nvidia.dali")
    from service.pipeline.dali_decode import DaliBatchDecoder
    from tests.service.pipeline.test_decode import LIMITS, _spec
    from winnow.bench.throughput import camera_frames

    spec = _spec(3, (64, 64))
    decoder = DaliBatchDecoder(LIMITS, 2, 4, device="cpu")
    decoder.decode_now([(frame, None) for frame in camera_frames(4)], spec)
    python_threads = {t.native_id for t in threading.enumerate()}
    native = [tid for tid in CpuClock.snapshot().threads_s if tid not in python_threads]
    names = {tid: Path(f"/proc/self/task/{tid}/comm").read_text() for tid in native}
    dali = [tid for tid in native if names[tid].startswith("[DALI]")]
    stages = stage_breakdown(dict.fromkeys(native, 0.1), {}, process_s=0.1 * len(native))
    decoder.close()
    assert dali, names
    assert stages["decode"] == pytest.approx(0.1 * len(dali))
    assert stages["infer"] == pytest.approx(0.1 * (len(native) - len(dali)))  # BLAS, ORT
