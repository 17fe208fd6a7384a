"""A round's training in a child process (``trainer/round_worker.py``), on real digits."""

import dataclasses
import functools
import io
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from tests.trainer.helpers import digit_spec
from trainer.architectures import WinnowNet, build_model
from trainer.finetune import FinetuneConfig, RoundStats, finetune_round
from trainer.round_worker import RoundJob, RoundWorker, RoundWorkerError
from trainer.samples import Sample, SampleCache

CPU = torch.device("cpu")
CONFIG = FinetuneConfig(epochs=2, batch_size=16, seed=3)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    """120 digits as a round gets them: the sample cache's pixels under a spec."""
    data = load_digits()
    images = {f"d{i}": _png((data.images[i] * 255 / 16).astype(np.uint8)) for i in range(120)}
    labeled = [(f"d{i}", int(data.target[i])) for i in range(120)]
    return SampleCache().samples(labeled, digit_spec("w"), lambda ids: {i: images[i] for i in ids})


@pytest.fixture
def worker():
    made = RoundWorker(rounds_per_process=10, threads=torch.get_num_threads())
    yield made
    made.close()


def _model() -> WinnowNet:
    torch.manual_seed(0)
    return build_model("small-cnn", 10, 1)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _without_time(stats: RoundStats) -> RoundStats:
    return dataclasses.replace(stats, seconds=0.0)


def _spy_jobs(worker: RoundWorker, monkeypatch: pytest.MonkeyPatch) -> list[RoundJob]:
    jobs: list[RoundJob] = []
    make = worker._job

    def recorded(*args, **kwargs) -> RoundJob:
        jobs.append(make(*args, **kwargs))
        return jobs[-1]

    monkeypatch.setattr(worker, "_job", recorded)
    return jobs


def test_a_round_in_the_worker_trains_the_weights_a_round_here_does(
    worker: RoundWorker, samples: list[Sample], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails if the child trained anything else (other seed, threads, samples or labels,
    or weights not brought back), or if each round re-sent every frame's pixels."""
    jobs = _spy_jobs(worker, monkeypatch)
    here, there = _model(), _model()
    epochs_here: list[dict[str, float]] = []
    epochs_there: list[dict[str, float]] = []
    for new, replay in ((samples[:60], []), (samples[60:], samples[:60])):
        expected = finetune_round(here, new, replay, CONFIG, CPU, progress=epochs_here.append)
        got = worker.finetune(there, new, replay, CONFIG, CPU, progress=epochs_there.append)
        assert _without_time(got) == _without_time(expected)
        assert _same_weights(here, there) and not there.training
    # Each epoch's progress came back from the child, with the same losses.
    assert len(epochs_there) == len(epochs_here) > 2
    assert [(e["epoch"], e["loss"]) for e in epochs_there] == [
        (e["epoch"], e["loss"]) for e in epochs_here
    ]
    assert worker.started == 1
    # The second round sent only the frames the child did not hold yet, as pixels.
    assert set(jobs[0].sources) == {s.frame_id for s in samples[:60]}
    assert set(jobs[1].sources) == {s.frame_id for s in samples[60:]}
    assert jobs[1].sources["d60"].dtype == np.uint8


def test_a_fresh_child_takes_over_after_rounds_per_process(samples: list[Sample]) -> None:
    """Fails if the worker kept one process for ever (the memory it is there to shed),
    or left the old one running."""
    reasons: list[str] = []
    worker = RoundWorker(rounds_per_process=2, on_start=reasons.append)
    try:
        model, pids, after = _model(), [], []  # the children that trained each round
        for start in range(0, 90, 30):
            seen: set[int | None] = set()
            pids.append(seen)
            new, replay = samples[start : start + 30], samples[:start]
            record = functools.partial(lambda into, _: into.add(worker.pid), seen)
            worker.finetune(model, new, replay, CONFIG, CPU, progress=record)
            after.append(worker.pid)
        assert pids[0] == pids[1] != pids[2] and all(len(p) == 1 for p in pids)
        # The second child started as the first retired, ready before the next round.
        assert {after[1]} == pids[2] and worker.started == 2
        assert reasons == ["first", "recycled"]
        with pytest.raises(ProcessLookupError):
            os.kill(next(iter(pids[0])), 0)  # reaped, not a zombie: the pid is free
        # The replacement had not seen the frames: they were sent again, and it trained.
        again = _model()
        finetune_round(again, samples[:30], [], CONFIG, CPU)
        finetune_round(again, samples[30:60], samples[:30], CONFIG, CPU)
        finetune_round(again, samples[60:90], samples[:60], CONFIG, CPU)
        assert _same_weights(model, again)
    finally:
        worker.close()


def test_a_child_killed_mid_round_is_replaced_and_the_round_trained_again(
    worker: RoundWorker, samples: list[Sample]
) -> None:
    """Fails if a child that dies (the OOM killer, a stray signal) failed the trainer, or
    if the retry started from a half-trained model."""
    killed: list[int] = []
    reasons: list[str] = []
    worker._on_start = reasons.append

    def kill_once(_: dict[str, float]) -> None:
        if not killed and worker.pid is not None:
            killed.append(worker.pid)
            os.kill(worker.pid, signal.SIGKILL)

    model, expected = _model(), _model()
    worker.finetune(model, samples[:40], [], CONFIG, CPU, progress=kill_once)
    finetune_round(expected, samples[:40], [], CONFIG, CPU)
    assert killed and worker.pid != killed[0] and worker.started == 2
    assert reasons == ["first", "died"]  # what winnow_trainer_round_workers_started counts
    assert _same_weights(model, expected)


def test_an_error_in_training_fails_the_round_with_the_childs_traceback(
    worker: RoundWorker, samples: list[Sample]
) -> None:
    """Fails if the child's error were lost (a hang, or a bare "it died"), or if the model
    were changed by the failed round."""
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrong = dataclasses.replace(samples[0], label=99)  # not one of the ten classes
    with pytest.raises(RoundWorkerError, match="Traceback"):
        worker.finetune(model, [wrong, *samples[1:20]], [], CONFIG, CPU)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    worker.finetune(model, samples[:20], [], CONFIG, CPU)  # the same child trains on
    assert worker.started == 1


def test_close_stops_a_round_at_once_and_refuses_later_rounds(
    worker: RoundWorker, samples: list[Sample]
) -> None:
    """Fails if a trainer stopping mid-round had to wait for the round (or hung), or if the
    child outlived it."""
    pids: list[int] = []

    def close_in_the_first_epoch(_: dict[str, float]) -> None:
        pids.append(worker.pid or 0)
        worker.close()

    many = FinetuneConfig(epochs=50, batch_size=16, seed=3)
    with pytest.raises(RoundWorkerError):
        worker.finetune(_model(), samples, [], many, CPU, progress=close_in_the_first_epoch)
    assert pids == [pids[0]] and worker.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)
    with pytest.raises(RoundWorkerError, match="closed"):
        worker.finetune(_model(), samples[:10], [], CONFIG, CPU)


def test_rounds_per_process_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RoundWorker(rounds_per_process=0)
