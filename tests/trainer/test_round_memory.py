"""A round's memory does not grow with the labels: samples keep their pixels, and every
pass over many of them (replay candidates, holdout, drift reference, a new head)
normalizes and stacks a batch at a time."""

import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from schemas.model_spec import ModelSpec
from tests.trainer.helpers import digit_spec
from trainer.architectures import build_model
from trainer.evaluate import correct
from trainer.finetune import FinetuneConfig, select_replay
from trainer.forward import EVAL_BATCH, forward_eval, forward_samples
from trainer.head import EmbeddingCache, refit_head
from trainer.reference import reference_for
from trainer.samples import Sample, stack

CPU = torch.device("cpu")
LABELS = 3000
SIDE = 32


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return digit_spec("base-1", SIDE, channels=3, std=0.25)


@pytest.fixture(scope="module")
def samples(spec: ModelSpec) -> list[Sample]:
    """3,000 samples as the sample cache gives them: uint8 pixels and the spec."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (LABELS, SIDE, SIDE, 3), dtype=np.uint8)
    return [Sample(f"f{i}", pixels[i], i % 10, spec) for i in range(LABELS)]


def _peak(work: Callable[[], object]) -> float:
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_samples_of_pixels_stack_into_the_inputs_decode_would_make(
    samples: list[Sample],
) -> None:
    inputs, labels = stack(samples[:7])
    assert inputs.shape == (7, 3, SIDE, SIDE) and inputs.dtype == np.float32
    for row, sample in zip(inputs, samples[:7], strict=True):
        np.testing.assert_array_equal(row, sample.inputs)
    assert labels.tolist() == [s.label for s in samples[:7]]


def test_passes_over_samples_a_batch_at_a_time_give_the_outputs_of_one_pass(
    samples: list[Sample],
) -> None:
    """Fails if the batches differ from ``forward_eval``'s (outputs would then differ in the
    last bits) or samples are dropped or reordered."""
    model = build_model("small-cnn", 10, 3).eval()
    some = samples[:600]
    (probabilities, embeddings), labels = forward_samples(model, some, CPU)
    whole = forward_eval(model, stack(some)[0], CPU)
    np.testing.assert_array_equal(probabilities, whole[0])
    np.testing.assert_array_equal(embeddings, whole[1])
    assert labels.tolist() == [s.label for s in some]


def _passes(
    model: nn.Module, samples: list[Sample], replayed: int
) -> dict[str, Callable[[], object]]:
    """The round's passes over many labels, by name, each over ``samples``."""
    return {
        "holdout": lambda: correct(model, samples, CPU),
        "replay": lambda: select_replay(
            model, samples, replayed, FinetuneConfig(), CPU, np.random.default_rng(0)
        ),
        "reference": lambda: reference_for(model, samples, [], CPU),
        "head": lambda: refit_head(model, samples, CPU),
    }


@pytest.mark.parametrize("work", ["holdout", "replay", "reference", "head"])
def test_a_pass_over_every_label_holds_a_batch_of_inputs_not_all(
    samples: list[Sample], work: str
) -> None:
    """The failure it catches: a round stacking the float32 inputs of all its samples at
    once (3,000 labels at 3 x 32 x 32: 35 MiB here; 1.7 GiB at 224 x 224), which grew the
    trainer's memory with each label."""
    torch.manual_seed(0)
    model = build_model("small-cnn", 10, 3)
    runs = _passes(model, samples, replayed=500)
    everything = LABELS * 3 * SIDE * SIDE * 4 / 2**20
    peak = _peak(runs[work])
    assert peak < everything / 2, f"{peak:.1f} MiB at the peak; all inputs are {everything:.0f}"


@pytest.mark.parametrize("work", ["holdout", "replay", "reference", "head", "embeddings"])
def test_every_pass_over_many_samples_runs_at_most_the_eval_batch_at_once(
    samples: list[Sample], spec: ModelSpec, work: str
) -> None:
    """The failure it catches: a pass that runs 256 rows at once (the earlier default).
    Its activations are what it holds at its peak (the small CNN at 16x16: 24 MB at 256
    rows, 10 MB at 64), and the round thread's heap keeps room for the largest peak: in
    the 60-minute soak the trainer's memory grew in one 20 MB step."""
    torch.manual_seed(0)
    model = build_model("small-cnn", 10, 3)
    rows: set[int] = set()
    model.backbone[0].register_forward_pre_hook(lambda _m, args: rows.add(args[0].shape[0]))
    some = samples[:300]
    runs = _passes(model, some, replayed=100)
    runs["embeddings"] = lambda: EmbeddingCache().embeddings(
        model,
        spec,
        "base-1",
        [s.frame_id for s in some],
        lambda _ids: {},
        CPU,
        decoded={s.frame_id: s for s in some},
    )
    runs[work]()
    assert rows and max(rows) == EVAL_BATCH <= 64, sorted(rows)


def test_a_head_refit_on_no_samples_says_so() -> None:
    with pytest.raises(ValueError, match="zero samples"):
        refit_head(build_model("small-cnn", 10, 3), [], CPU)
