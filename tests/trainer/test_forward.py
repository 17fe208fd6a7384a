"""Eval-mode forward passes in padded batches: the same outputs, a few batch shapes."""

import numpy as np
import pytest
import torch
from torch import nn

from trainer.architectures import build_model
from trainer.forward import bucket, forward_eval

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("n", "batch_size", "want"),
    [(1, 256, 1), (2, 256, 2), (3, 256, 4), (5, 256, 8), (129, 256, 256), (300, 256, 256),
     (33, 32, 32), (0, 256, 1)],
)  # fmt: skip
def test_a_batch_is_padded_to_the_next_power_of_two_at_most_the_batch_size(
    n: int, batch_size: int, want: int
) -> None:
    assert bucket(n, batch_size) == want


def test_the_outputs_match_one_plain_pass_and_the_mode_is_restored() -> None:
    """Fails if padding rows leaked into the outputs or shifted them."""
    torch.manual_seed(0)
    model = build_model("small-cnn", 4, 1, None)
    model.train()
    inputs = np.random.default_rng(0).normal(size=(37, 1, 16, 16)).astype(np.float32)
    probabilities, embeddings = forward_eval(model, inputs, CPU, batch_size=16)
    assert model.training
    model.eval()
    with torch.inference_mode():
        want_p, want_e = model(torch.from_numpy(inputs))
    assert probabilities.shape == (37, 4) and embeddings.shape == (37, model.embedding_dim)
    np.testing.assert_allclose(probabilities, want_p.numpy(), atol=1e-5)
    np.testing.assert_allclose(embeddings, want_e.numpy(), atol=1e-5)


def test_a_module_sees_a_few_batch_sizes_however_many_inputs_come() -> None:
    """Fails if batches went in at their own sizes: CPU torch caches kernels per shape, so the
    trainer's memory grew with every new count of frames it embedded (a soak's RSS slope)."""
    seen: set[int] = set()
    layer = nn.Linear(3, 2)
    layer.register_forward_pre_hook(lambda _m, args: seen.add(args[0].shape[0]))
    for n in range(1, 600):
        (out,) = forward_eval(layer, np.ones((n, 3), np.float32), CPU, batch_size=256)
        assert out.shape == (n, 2)
    assert seen == {1, 2, 4, 8, 16, 32, 64, 128, 256}


def test_no_inputs_give_no_outputs() -> None:
    assert forward_eval(nn.Linear(3, 2), np.zeros((0, 3), np.float32), CPU) == []
