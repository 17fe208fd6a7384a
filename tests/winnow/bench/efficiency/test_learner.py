"""The learner: a round every ``round_labels`` labels, head refits in between."""

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from trainer.samples import Sample
from winnow.bench.efficiency import learner as learner_module
from winnow.bench.efficiency.errors import BenchConfigError
from winnow.bench.efficiency.learner import (
    Learner,
    LearnerConfig,
    finetune_config,
    resolve_head_refit,
)
from winnow.bench.efficiency.stream import StreamData


def _data(n: int = 40) -> StreamData:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    inputs = (rng.normal(size=(n, 1, 8, 8)) + labels[:, None, None, None]).astype(np.float32)
    return StreamData(
        inputs, labels, np.arange(n), inputs, labels, ["a", "b"], "small-cnn", 1, "accuracy"
    )


def _recording_refit() -> tuple[list[int], Any]:
    """A head refit that leaves the model and records how many samples each call had."""
    refits: list[int] = []

    def refit(model: Any, samples: Sequence[Sample]) -> Any:
        refits.append(len(samples))
        return model

    return refits, refit


def test_rounds_and_refits_come_when_their_label_counts_are_reached() -> None:
    data = _data()
    refits, refit = _recording_refit()
    learner = Learner(data, LearnerConfig(round_labels=4, refit_labels=2, min_steps=2), 0, refit)
    changed = [learner.add(Sample(str(i), data.inputs[i], int(data.labels[i]))) for i in range(7)]
    # refit at 2, round ended by a refit at 4, refit at 6: each on every label so far
    assert changed == [False, True, False, True, False, True, False]
    assert (learner.rounds, learner.refits) == (1, 3)
    assert refits == [2, 4, 6]
    assert learner.labels_learned == 6
    assert learner.flush()
    assert (learner.rounds, learner.labels_learned) == (2, 7)
    assert not learner.flush()


def test_refits_also_wait_for_a_share_of_the_labels_as_the_trainer_does() -> None:
    """Catches a bench learner that refits more often than the trainer once labels grow."""
    data = _data()
    refits, refit = _recording_refit()
    config = LearnerConfig(round_labels=100, refit_labels=2, refit_share=0.5, min_steps=2)
    learner = Learner(data, config, 0, refit)
    for i in range(20):
        learner.add(Sample(str(i), data.inputs[i], int(data.labels[i])))
    assert refits == [2, 4, 6, 9, 14]  # waits of 2, 2, 2, 3 (half of 6), 5 (half of 9)


def test_the_same_seed_gives_the_same_initial_model() -> None:
    data = _data()
    a = Learner(data, LearnerConfig(), 3, None).run(data.test_inputs)[0]
    b = Learner(data, LearnerConfig(), 3, None).run(data.test_inputs)[0]
    c = Learner(data, LearnerConfig(), 4, None).run(data.test_inputs)[0]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_head_refits_asked_for_without_the_trainers_say_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(learner_module, "trainer_head_refit", lambda class_balance=0.0: None)
    with pytest.raises(BenchConfigError, match="not available yet"):
        resolve_head_refit(True)
    assert resolve_head_refit(None) is None
    assert resolve_head_refit(False) is None


def test_pseudo_labels_come_from_the_unlabeled_frames_only_when_asked_for() -> None:
    from trainer.pseudo import UNLABELED

    data = _data(60)
    seen = [Sample(str(i), data.inputs[i], UNLABELED) for i in range(60)]
    learned: list[list[str]] = []

    def refit(model: Any, samples: Sequence[Sample]) -> Any:
        learned.append([s.frame_id for s in samples])
        return model

    for pseudo, expected in ((0.0, 0), (2.0, 8)):
        learned.clear()
        config = LearnerConfig(round_labels=4, refit_labels=2, min_steps=2, pseudo=pseudo)
        learner = Learner(data, config, 0, refit)
        learner.unlabeled.extend(seen)
        for i in range(4):
            learner.add(Sample(str(i), data.inputs[i], int(data.labels[i])))
        assert learner.pseudo_labels == expected
        extra = [ids[len(ids) - expected :] for ids in learned][-1] if expected else []
        assert len(learned[-1]) == 4 + expected
        assert not set(extra) & {"0", "1", "2", "3"}


def test_shrink_and_perturb_reach_the_rounds_and_the_full_data_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Catches --shrink/--perturb measured on a learner that never applies them."""
    seen: list[tuple[float, float, int]] = []
    from trainer import finetune

    real = finetune.finetune_round

    def spy(model: Any, new: Any, pool: Any, config: Any, *args: Any, **kw: Any) -> Any:
        stats = real(model, new, pool, config, *args, **kw)
        seen.append((config.shrink, config.perturb, int(stats.shrunk)))
        return stats

    monkeypatch.setattr(finetune, "finetune_round", spy)
    data = _data()
    config = LearnerConfig(round_labels=4, refit_labels=100, min_steps=2, shrink=0.5, perturb=0.01)
    learner = Learner(data, config, 0, None)
    for i in range(8):
        learner.add(Sample(str(i), data.inputs[i], int(data.labels[i])))
    learner_module.full_data_confusion(data, LearnerConfig(full_steps=2, shrink=0.7), 0, None)
    assert seen == [(0.5, 0.01, 1), (0.5, 0.01, 1), (0.7, 0.01, 1)]
    plain = Learner(data, LearnerConfig(round_labels=4, min_steps=2), 0, None)
    for i in range(4):
        plain.add(Sample(str(i), data.inputs[i], int(data.labels[i])))
    assert seen[-1] == (0.6, 0.01, 1)  # the trainer's default for the small CNN
    off = Learner(data, LearnerConfig(round_labels=4, min_steps=2, shrink=1, perturb=0), 0, None)
    for i in range(4):
        off.add(Sample(str(i), data.inputs[i], int(data.labels[i])))
    assert seen[-1] == (1.0, 0.0, 0)


def test_cached_features_train_their_head_as_measured() -> None:
    """A pretrained backbone's cached features train the head alone: not shrunk (as the
    trainer does not shrink a pretrained backbone), 200 steps, no augmentation. Catches the
    small CNN's defaults (shrink and perturb, 400 steps) leaking into the pretrained runs."""
    data = dataclasses.replace(_data(), features=True)
    config = finetune_config(data, 0)
    assert (config.shrink, config.perturb, config.min_steps, config.augment) == (
        1.0,
        0.0,
        200,
        False,
    )
    assert finetune_config(data, 0, shrink=0.5).shrink == 0.5  # asked for, it applies
    images = finetune_config(_data(), 0)
    assert (images.shrink, images.perturb, images.min_steps) == (0.6, 0.01, 400)


def test_class_balance_reaches_the_rounds_the_refits_and_the_full_data_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Catches --class-balance measured on a learner that never applies it, and a default
    that is not the trainer's."""
    import argparse

    from trainer import finetune, head
    from winnow.bench.label_efficiency import add_arguments, config_from_args

    rounds: list[float] = []
    refits: list[float] = []
    real_round, real_refit = finetune.finetune_round, head.refit_head

    def spy_round(model: Any, new: Any, pool: Any, config: Any, *args: Any, **kw: Any) -> Any:
        rounds.append(config.class_balance)
        return real_round(model, new, pool, config, *args, **kw)

    def spy_refit(model: Any, samples: Any, *args: Any, class_balance: float = 0.0) -> Any:
        refits.append(class_balance)
        return real_refit(model, samples, *args, class_balance=class_balance)

    monkeypatch.setattr(finetune, "finetune_round", spy_round)
    monkeypatch.setattr(head, "refit_head", spy_refit)
    data = _data()
    config = LearnerConfig(round_labels=4, refit_labels=2, min_steps=2, class_balance=1.0)
    learner = Learner(data, config, 0, resolve_head_refit(True, config.class_balance))
    for i in range(4):
        learner.add(Sample(str(i), data.inputs[i], int(data.labels[i])))
    full = LearnerConfig(full_steps=2, class_balance=0.5)
    learner_module.full_data_confusion(data, full, 0, resolve_head_refit(True, 0.5))
    assert rounds == [1.0, 0.5] and refits == [1.0, 1.0, 0.5]

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    from trainer.config import TrainerSettings

    default = config_from_args(parser.parse_args([])).run.learner.class_balance
    assert default == TrainerSettings.model_fields["class_balance"].default
    given = config_from_args(parser.parse_args(["--class-balance", "0.5"]))
    assert given.run.learner.class_balance == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(["--class-balance", "2"])


def _seen_by_rounds(monkeypatch: pytest.MonkeyPatch, field: str, value: Any) -> list[Any]:
    """``field`` of every ``FinetuneConfig`` that ``finetune_round`` gets from now on (the
    list keeps growing), after a learner's round and a full-data run with ``field`` set
    to ``value``."""
    from trainer import finetune

    seen: list[Any] = []
    real = finetune.finetune_round

    def spy(model: Any, new: Any, pool: Any, config: Any, *args: Any, **kw: Any) -> Any:
        seen.append(getattr(config, field))
        return real(model, new, pool, config, *args, **kw)

    monkeypatch.setattr(finetune, "finetune_round", spy)
    data = _data()
    learner = Learner(data, LearnerConfig(round_labels=4, min_steps=2, **{field: value}), 0, None)
    for i in range(4):
        learner.add(Sample(str(i), data.inputs[i], int(data.labels[i])))
    full = LearnerConfig(full_steps=2, **{field: value})
    learner_module.full_data_confusion(data, full, 0, None)
    return seen


def test_the_precision_reaches_the_rounds_and_the_full_data_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Catches --train-precision measured on a learner that never applies it, and an ``auto``
    recorded as such instead of what it ran on this machine."""
    import argparse

    from trainer import finetune
    from winnow.bench.label_efficiency import add_arguments, config_from_args

    seen = _seen_by_rounds(monkeypatch, "train_precision", "bf16")
    assert seen == ["bf16", "bf16"]

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for amx, auto in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(finetune, "cpu_has_amx_bf16", lambda amx=amx: amx)
        for given, expected in (([], auto), (["--train-precision", "auto"], auto)):
            config = config_from_args(parser.parse_args(given))
            assert config.run.learner.train_precision == expected, (amx, given)
        for asked in ("fp32", "bf16"):
            config = config_from_args(parser.parse_args(["--train-precision", asked]))
            assert config.run.learner.train_precision == asked
    with pytest.raises(SystemExit):
        parser.parse_args(["--train-precision", "float16"])


def test_the_learning_rate_schedule_reaches_the_rounds_and_the_full_data_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Catches --lr-schedule measured on a learner that never applies it."""
    from trainer import finetune

    seen = _seen_by_rounds(monkeypatch, "lr_schedule", "cosine")
    data = _data()
    plain = Learner(data, LearnerConfig(round_labels=4, min_steps=2), 0, None)
    for i in range(4):
        plain.add(Sample(str(i), data.inputs[i], int(data.labels[i])))
    assert seen == ["cosine", "cosine", finetune.FinetuneConfig().lr_schedule]
