"""Pseudo-labels from label spreading (trainer/pseudo.py): synthetic clusters where the
answer is known, and real handwritten digits through a real torch backbone."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.pixels import image_to_input
from tests.trainer.helpers import digit_spec
from trainer.architectures import build_model
from trainer.finetune import FinetuneConfig, finetune_round
from trainer.model_init import seed_everything
from trainer.pseudo import (
    UNLABELED,
    SpreadConfig,
    label_graph,
    pick,
    pseudo_labeled,
    pseudo_samples,
    spread,
)
from trainer.samples import Sample

CPU = torch.device("cpu")


def _blobs(per: int = 60, classes: int = 3, dim: int = 8, seed: int = 0) -> np.ndarray:
    """``classes`` tight clusters far apart, ``per`` points each, in class order."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 10
    return np.concatenate([c + rng.normal(size=(per, dim)) for c in centres]).astype(np.float32)


def test_one_label_per_cluster_labels_the_whole_cluster() -> None:
    x = _blobs()
    truth = np.repeat(np.arange(3), 60)
    labeled = np.array([5, 70, 130])
    scores = spread(x, labeled, truth[labeled], 3)
    assert scores.shape == (180, 3)
    assert np.allclose(scores.sum(axis=1), 1)
    assert np.array_equal(scores.argmax(axis=1), truth)


def test_a_cluster_no_label_reaches_gets_no_scores_and_is_never_picked() -> None:
    x = _blobs()
    truth = np.repeat(np.arange(3), 60)
    labeled = np.array([5, 70])  # the third cluster has no label
    scores = spread(x, labeled, truth[labeled], 3, SpreadConfig(neighbours=5))
    assert np.all(scores[120:] == 0)
    rows, classes = pick(scores, np.arange(180), budget=300)
    assert len(rows) and not np.any(rows >= 120)
    assert np.array_equal(classes, truth[rows])


def test_pick_takes_the_most_confident_the_same_number_per_class() -> None:
    scores = np.array(
        [[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9], [0.0, 0.0], [0.95, 0.05]]
    )
    rows, classes = pick(scores, np.arange(6), budget=4)  # row 6 is not a candidate
    assert rows.tolist() == [0, 2, 4, 3]
    assert classes.tolist() == [0, 0, 1, 1]
    rows, _ = pick(scores, np.arange(6), budget=1)  # less than one a class: none
    assert len(rows) == 0


def test_bad_inputs_are_refused() -> None:
    x = _blobs()
    with pytest.raises(ValueError, match="one label per labeled row"):
        spread(x, np.array([1, 2]), np.array([0]), 3)
    with pytest.raises(ValueError, match="labels must be in"):
        spread(x, np.array([1]), np.array([3]), 3)
    with pytest.raises(ValueError, match="out of range"):
        spread(x, np.array([180]), np.array([0]), 3)
    with pytest.raises(ValueError, match="alpha"):
        SpreadConfig(alpha=1.0)
    with pytest.raises(ValueError, match="per_label"):
        SpreadConfig(per_label=-1)


def test_digits_get_mostly_right_pseudo_labels_balanced_and_capped(digits) -> None:
    pngs, targets = digits
    spec = digit_spec("base-1")
    frames = [
        Sample(f"f{i}", image_to_input(Image.open(io.BytesIO(png)), spec), int(targets[i]))
        for i, png in enumerate(pngs[:900])
    ]
    labeled = [next(s for s in frames if s.label == c and s.frame_id != "f0") for c in range(10)]
    labeled = labeled + [s for s in frames[200:] if s not in labeled][:40]  # 50 labels
    seed_everything(0)
    model = build_model("small-cnn", 10, 1).eval()
    finetune_round(model, labeled, [], FinetuneConfig.for_arch("small-cnn", seed=0), CPU)
    truth = {s.frame_id: s.label for s in frames}
    unlabeled = [Sample(s.frame_id, s.source, UNLABELED) for s in frames]
    picked = pseudo_samples(model, labeled, unlabeled, SpreadConfig(per_label=2))
    ids = [s.frame_id for s in picked]
    assert len(ids) == len(set(ids)) and not set(ids) & {s.frame_id for s in labeled}
    assert 80 <= len(picked) <= 100
    assert max(np.bincount([s.label for s in picked], minlength=10)) <= 10
    correct = np.mean([s.label == truth[s.frame_id] for s in picked])
    assert correct >= 0.9, correct
    assert pseudo_samples(model, labeled, unlabeled, SpreadConfig(per_label=0)) == []


def test_one_graph_serves_later_labels_and_keeps_labeled_frames_given_last() -> None:
    x = _blobs(per=40)
    truth = np.repeat(np.arange(3), 40)
    frames = [Sample(f"f{i}", x[i][None, None, :], UNLABELED) for i in range(120)]

    class Flat(torch.nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return inputs.flatten(1)

    seed_everything(0)
    model = build_model("small-cnn", 3, 1)
    model.backbone = Flat()
    model.embedding_dim = 8
    labeled = [Sample(f"f{i}", x[i][None, None, :], int(truth[i])) for i in (0, 41, 85)]
    # 100 frames at most: f0 is among the oldest, but given again as labeled it is kept.
    config = SpreadConfig(per_label=4, max_frames=100)
    graph = label_graph(model, [*frames, *labeled], config)
    assert len(graph) == 100 and "f0" in graph.rows and "f1" not in graph.rows
    picked = pseudo_labeled(graph, labeled, 3, config)
    assert len(picked) == 12
    assert all(s.label == truth[int(s.frame_id[1:])] for s in picked)
    # A label the graph does not hold counts towards the number taken but cannot spread.
    later = [*labeled[:2], Sample("new", x[90][None, None, :], 2)]
    picked = pseudo_labeled(graph, later, 3, config)
    assert {s.label for s in picked} == {0, 1} and len(picked) == 8
