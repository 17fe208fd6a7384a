"""Each release's spec names its backbone: a full release its own version, a head-only
release its base (the scorer's drift monitor keeps the embedding detector across it)."""

import copy
from pathlib import Path

import numpy as np
import torch

from trainer.config import TrainerSettings
from trainer.evaluate import Prequential
from trainer.head import EmbeddingCache
from trainer.lineage import initial_model
from trainer.refit import build_head
from trainer.rounds import RoundInputs, RoundSettings, build_round, split_items
from trainer.samples import SampleCache
from trainer.store import TrainItem

CPU = torch.device("cpu")
GATE = RoundSettings(holdout_fraction=0.0, release_margin=1.0, release_alpha=0.05, seed=0)


def test_full_and_head_releases_name_their_backbone(
    digits: tuple[list[bytes], np.ndarray], tmp_path: Path
) -> None:
    pngs, targets = digits
    settings = TrainerSettings(
        data_dir=tmp_path, classes=[str(d) for d in range(10)], input_size=8, channels=1
    )
    model, cold, fresh = initial_model(settings)
    assert fresh and cold.backbone_version == cold.version

    def images(ids: list[str]) -> dict[str, bytes]:
        return {f: pngs[int(f[1:])] for f in ids}

    items = [TrainItem(f"f{i}", str(targets[i]), i, True) for i in range(30)]
    head = build_head(model, cold, cold, items, EmbeddingCache(), images, GATE, CPU)
    assert head is not None and head.spec is not None and head.model is not None
    assert head.spec.backbone_version == cold.version != head.spec.version
    # a refit on a head-only release: still its base's backbone, not the head's version
    again = build_head(head.model, head.spec, cold, items, EmbeddingCache(), images, GATE, CPU)
    assert again is not None and again.spec is not None
    assert again.spec.backbone_version == cold.version

    split = split_items(items, head.spec, SampleCache(), images, GATE.holdout_fraction)
    start = RoundInputs(copy.deepcopy(head.model), head.spec, cold, Prequential(), set())
    built = build_round(start, split, GATE, CPU, "manual")
    assert built.spec is not None  # a new backbone, from a head-only release
    assert built.spec.backbone_version == built.spec.version != cold.version


def test_a_round_shrinks_and_perturbs_as_the_settings_say(
    digits: tuple[list[bytes], np.ndarray], tmp_path: Path, monkeypatch
) -> None:
    """WINNOW_TRAINER_SHRINK, _PERTURB, _LR_SCHEDULE and _TRAIN_PRECISION reach the round's
    fine-tuning; unset, the small CNN's defaults (0.6 and 0.01, a constant rate) and ``auto``
    precision apply. Catches settings that are read but never applied, and an unset setting
    that turns the architecture's default off."""
    import trainer.rounds as rounds

    pngs, targets = digits
    seen: list[tuple[float, float, bool, str, str]] = []
    real = rounds.finetune_round

    def spy(model, new, pool, config, *args, **kwargs):  # type: ignore[no-untyped-def]
        stats = real(model, new, pool, config, *args, **kwargs)
        seen.append(
            (
                config.shrink,
                config.perturb,
                stats.shrunk,
                config.lr_schedule,
                config.train_precision,
            )
        )
        return stats

    monkeypatch.setattr(rounds, "finetune_round", spy)
    items = [TrainItem(f"f{i}", str(targets[i]), i, True) for i in range(30)]

    def images(ids: list[str]) -> dict[str, bytes]:
        return {f: pngs[int(f[1:])] for f in ids}

    for env, expected in (
        ({}, (0.6, 0.01, True, "constant", "auto")),
        ({"shrink": 1.0, "perturb": 0.0}, (1.0, 0.0, False, "constant", "auto")),
        (
            {"shrink": 0.8, "lr_schedule": "cosine", "train_precision": "fp32"},
            (0.8, 0.01, True, "cosine", "fp32"),
        ),
    ):
        settings = TrainerSettings(
            data_dir=tmp_path / str(len(seen)),
            classes=[str(d) for d in range(10)],
            input_size=8,
            channels=1,
            **env,
        )
        model, cold, _ = initial_model(settings)
        gate = RoundSettings.of(settings)  # what Trainer._gate gives its rounds
        assert (gate.shrink, gate.perturb) == (env.get("shrink"), env.get("perturb"))
        split = split_items(items, cold, SampleCache(), images, 0.0)
        build_round(
            RoundInputs(model, cold, cold, Prequential(), set()), split, gate, CPU, "manual"
        )
        assert seen[-1] == expected


def test_class_balance_reaches_the_rounds_and_the_head_refits(
    digits: tuple[list[bytes], np.ndarray], tmp_path: Path, monkeypatch
) -> None:
    """WINNOW_TRAINER_CLASS_BALANCE weighs the classes in a backbone round's loss and in a head
    refit's fit alike, and the release gate of each weighs the held-out frames by class
    (balanced accuracy); unset, none is weighted. Catches a setting read but never applied."""
    import trainer.refit as refit
    import trainer.rounds as rounds

    pngs, targets = digits
    powers: list[float] = []
    weighted: list[bool] = []
    real_round, real_fit = rounds.finetune_round, refit.fit_head

    def spy_round(model, new, pool, config, *args, **kwargs):  # type: ignore[no-untyped-def]
        powers.append(config.class_balance)
        return real_round(model, new, pool, config, *args, **kwargs)

    def spy_fit(*args, sample_weight=None, **kwargs):  # type: ignore[no-untyped-def]
        weighted.append(sample_weight is not None)
        return real_fit(*args, sample_weight=sample_weight, **kwargs)

    gated: list[bool] = []  # whether each gate weighed the held-out frames by class

    def spy_gate(gate):  # type: ignore[no-untyped-def]
        def spy(*args, weights=None, **kwargs):  # type: ignore[no-untyped-def]
            gated.append(weights is not None)
            return gate(*args, weights=weights, **kwargs)

        return spy

    monkeypatch.setattr(rounds, "finetune_round", spy_round)
    monkeypatch.setattr(refit, "fit_head", spy_fit)
    monkeypatch.setattr(rounds, "release_gate", spy_gate(rounds.release_gate))
    monkeypatch.setattr(refit, "release_gate", spy_gate(refit.release_gate))
    # 25 of class 0 and 5 of class 1: uneven, so weights exist when asked for
    order = [i for i in range(len(targets)) if targets[i] == 0][:25]
    order += [i for i in range(len(targets)) if targets[i] == 1][:5]
    items = [TrainItem(f"f{i}", str(targets[i]), n, True) for n, i in enumerate(order)]

    def images(ids: list[str]) -> dict[str, bytes]:
        return {f: pngs[int(f[1:])] for f in ids}

    for env in ({}, {"class_balance": 1.0}):
        settings = TrainerSettings(
            data_dir=tmp_path / str(len(powers)),
            classes=[str(d) for d in range(10)],
            input_size=8,
            channels=1,
            holdout_fraction=0.5,
            **env,
        )
        model, cold, _ = initial_model(settings)
        gate = RoundSettings.of(settings)
        split = split_items(items, cold, SampleCache(), images, 0.5)
        assert {s.label for s in split.holdout} == {0, 1}  # uneven classes held out too
        build_round(RoundInputs(model, cold, cold, Prequential(), set()), split, gate, CPU, "x")
        build_head(model, cold, cold, items, EmbeddingCache(), images, gate, CPU)
    assert powers == [0.0, 1.0]
    assert weighted[0] is False and weighted[-1] is True
    # and the release gate judges the held-out frames as the loss weighs them
    assert gated == [False, False, True, True]
