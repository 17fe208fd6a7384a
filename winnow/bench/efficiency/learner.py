"""The learner every strategy is judged with: the trainer's own, the same for random.

Labels arrive one at a time from the oracle. Every ``round_labels`` labels,
``trainer.finetune.finetune_round`` fine-tunes the model from its current
weights on the new labels plus a replay of earlier ones (``FinetuneConfig``
as the trainer builds it), exactly as a trainer round does; there is no
release gate, each round's model is the next one. With head refits, the
trainer's head refit (``trainer.head.refit_head``: the linear head on frozen
embeddings of every label so far, pulled towards the current head) ends each
round and runs every ``refit_labels`` labels between rounds (or
``refit_share`` of the labels so far, when more), as the trainer does. The
model is measured on the test split after each change, so the curve has a
point per round and per refit. The cadence defaults to the trainer's own
settings (:func:`trainer_cadence`).

With pseudo-labels (``LearnerConfig.pseudo``), every round and refit also
learns from the unlabeled frames the stream has shown so far, labeled by
``trainer.pseudo`` (label spreading on the current backbone's embeddings).
The trainer does not collect unlabeled frames yet, so this is the learner it
would be; it is off unless asked for.

The full-data reference is the same learner given every training label at
once: one long round, ended by the refit.
"""

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from winnow.bench.efficiency.curves import confusion
from winnow.bench.efficiency.errors import BenchConfigError
from winnow.bench.efficiency.stream import StreamData

HeadRefit = Callable[[Any, Sequence[Any]], Any]
"""A model with its head refit on the given samples (the backbone frozen)."""


class HeadRefitUnavailable(BenchConfigError):
    """Head refits were asked for but the trainer does not have them yet."""


def trainer_head_refit(class_balance: float = 0.0) -> HeadRefit | None:
    """The trainer's head refit (with the rounds' class weights), or None while
    ``trainer.head.refit_head`` does not exist."""
    try:
        module = importlib.import_module("trainer.head")
    except ImportError:
        return None
    refit = getattr(module, "refit_head", None)
    if refit is None:
        return None

    def run(model: Any, samples: Sequence[Any]) -> Any:
        import torch

        return refit(model, samples, torch.device("cpu"), class_balance=class_balance)

    return run


def resolve_head_refit(wanted: bool | None, class_balance: float = 0.0) -> HeadRefit | None:
    """The refit a run uses: None (default) means on when the trainer has it.

    Raises:
        HeadRefitUnavailable: refits were asked for explicitly and do not exist.
    """
    refit = trainer_head_refit(class_balance) if wanted is not False else None
    if wanted and refit is None:
        raise HeadRefitUnavailable(
            "--head-refits: the trainer's head refit (trainer.head.refit_head) is not "
            "available yet; run with --no-head-refits"
        )
    return refit


def trainer_cadence() -> tuple[int, int, float]:
    """The trainer's defaults: labels per backbone round, per head refit (0: none), and
    the share of the labels learned that a refit also waits for.

    Read from ``TrainerSettings``' field defaults (``round_min_labels``,
    ``head_refit_labels``, ``head_refit_share``), so the bench follows the trainer
    when they change.
    """
    from trainer.config import TrainerSettings

    fields = TrainerSettings.model_fields
    refit = fields["head_refit_labels"].default
    share = fields["head_refit_share"].default
    return int(fields["round_min_labels"].default), int(refit), float(share)


@dataclass(frozen=True)
class LearnerConfig:
    """How the learner trains.

    Attributes:
        round_labels: labels that start a fine-tuning round.
        refit_labels: labels between head refits (with a refit).
        refit_share: and at least this share of the labels the last refit learned
            from (``trainer.refit.refit_wait``, the trainer's ``head_refit_share``).
        min_steps: optimizer steps per round, at least; None: the trainer's default for
            the architecture (``FinetuneConfig.for_arch``).
        full_steps: steps of the full-data run (None: at least 600, 10 epochs).
        pseudo: pseudo-labels per label from the unlabeled frames seen (0: none).
        shrink, perturb: shrink and perturb before each round on every label
            (``FinetuneConfig``; 1 and 0: off), the full-data run included; None: the
            trainer's default for the architecture (on for the small CNN).
        class_balance: the loss's class weights (``WINNOW_TRAINER_CLASS_BALANCE``) in
            rounds, refits and the full-data run.
        lr_schedule: the rounds' learning-rate schedule (``FinetuneConfig``), the
            full-data run included; None: the trainer's default.
        train_precision: the rounds' arithmetic, ``fp32`` or ``bf16`` (``FinetuneConfig``;
            the command line resolves the trainer's ``auto`` on this machine, so that a
            result says which one ran), the full-data run included.
    """

    round_labels: int = 20
    refit_labels: int = 3
    refit_share: float = 0.01
    min_steps: int | None = None
    full_steps: int | None = None
    pseudo: float = 0.0
    shrink: float | None = None
    perturb: float | None = None
    class_balance: float = 0.0
    lr_schedule: str | None = None
    train_precision: str = "fp32"


def forward(model: Any, inputs: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and embeddings in eval mode, in batches; images channels last on
    the CPU, as the rounds train (``trainer.finetune.channels_last``: faster there)."""
    import torch

    from trainer.finetune import channels_last

    probs, embs = [], []
    images = inputs.ndim == 4
    with channels_last(model, torch.device("cpu")) as layout, torch.inference_mode():
        for start in range(0, len(inputs), batch):
            x = torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch]))
            if images and layout is not None:
                x = x.contiguous(memory_format=layout)
            p, e = model(x)
            probs.append(p.numpy())
            embs.append(e.numpy())
    return np.concatenate(probs), np.concatenate(embs)


def build(data: StreamData, seed: int) -> Any:
    """The initial model of a seed: the same weights for every strategy of that seed."""
    from trainer.model_init import seed_everything

    seed_everything(seed)
    if data.features:
        from winnow.bench.efficiency.pretrained import head_model

        model = head_model(data.inputs.shape[1], len(data.classes))
    else:
        from trainer.architectures import build_model

        model = build_model(data.arch, len(data.classes), data.channels)
    model.eval()
    return model


def finetune_config(data: StreamData, seed: int, **overrides: Any) -> Any:
    """The trainer's fine-tuning configuration for this stream's architecture.

    Cached features cannot be shifted or zoomed, so augmentation is off for
    them; their rounds train the head alone, at the step the trainer uses for
    a model trained from scratch, 200 steps a round and not shrunk (as a
    pretrained backbone is not; the settings its figures were measured with).
    """
    from trainer.finetune import FinetuneConfig

    if data.features:
        kept = {"augment": False, "min_steps": 200, "shrink": 1.0, "perturb": 0.0}
        unset = {key: value for key, value in kept.items() if overrides.get(key) is None}
        return FinetuneConfig.for_arch("small-cnn", seed=seed, **{**overrides, **unset})
    return FinetuneConfig.for_arch(data.arch, seed=seed, **overrides)


class Learner:
    """The model of one run and how labels change it.

    Args:
        data: the stream (for the architecture and classes).
        config: rounds and refits.
        seed: initial weights, replay and augmentation.
        refit: the head refit, or None for rounds only.
    """

    def __init__(
        self, data: StreamData, config: LearnerConfig, seed: int, refit: HeadRefit | None
    ) -> None:
        import torch

        self.model = build(data, seed)
        self._config = config
        self._finetune = finetune_config(
            data,
            seed,
            min_steps=config.min_steps,
            shrink=config.shrink,
            perturb=config.perturb,
            class_balance=config.class_balance,
            lr_schedule=config.lr_schedule,
            train_precision=config.train_precision,
        )
        self._device = torch.device("cpu")
        self._refit = refit
        self._trained: list[Any] = []
        self._pending: list[Any] = []
        self._refit_at = 0
        self.unlabeled: list[Any] = []  # frames seen, oldest first (labels ignored)
        self.pseudo_labels = 0  # pseudo-labels the latest change learned from
        self._graph: Any = None  # trainer.pseudo.LabelGraph of the frames seen
        self._graph_rounds = -1  # the rounds it was built after
        self.rounds = 0
        self.refits = 0
        self.labels_learned = 0

    @property
    def answered(self) -> int:
        """Labels received so far."""
        return len(self._trained) + len(self._pending)

    @property
    def samples(self) -> list[Any]:
        """Every labeled sample so far, trained on or not."""
        return [*self._trained, *self._pending]

    def add(self, sample: Any) -> bool:
        """Takes one label; True when the model changed (a round or a head refit)."""
        self._pending.append(sample)
        if len(self._pending) >= self._config.round_labels:
            self._round()
            return True
        if self._refit is not None and self.answered - self._refit_at >= self._refit_wait():
            self._refit_head()
            return True
        return False

    def _refit_wait(self) -> int:
        from trainer.refit import refit_wait

        config = self._config
        return refit_wait(self._refit_at, config.refit_labels, config.refit_share)

    def flush(self) -> bool:
        """A last round on labels not trained on yet; True when there were any."""
        if not self._pending:
            return False
        self._round()
        return True

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and embeddings of the current model."""
        return forward(self.model, inputs)

    def confusion(self, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Test counts of the current model (true class by predicted class)."""
        probs, _ = self.run(inputs)
        return confusion(labels, probs.argmax(axis=1), probs.shape[1])

    def _pseudo(self, fresh: bool = False) -> list[Any]:
        """Pseudo-labeled unlabeled frames for the next change (none when off).

        The graph of the frames seen is built once per backbone (the embeddings
        change with rounds only) and again at the start of a round (``fresh``),
        so head refits spread labels over the frames seen up to the last round.
        """
        if self._config.pseudo <= 0:
            return []
        from trainer.pseudo import SpreadConfig, label_graph, pseudo_labeled

        config = SpreadConfig(per_label=self._config.pseudo)
        if fresh or self._graph is None or self._graph_rounds != self.rounds:
            frames = [*self.unlabeled, *self.samples]
            self._graph = label_graph(self.model, frames, config, self._device)
            self._graph_rounds = self.rounds
        extra = pseudo_labeled(self._graph, self.samples, self.model.num_classes, config)
        self.pseudo_labels = len(extra)
        return extra

    def _round(self) -> None:
        from trainer.finetune import finetune_round

        replay = [*self._trained, *self._pseudo(fresh=True)]
        finetune_round(self.model, self._pending, replay, self._finetune, self._device)
        self._trained.extend(self._pending)
        self._pending.clear()
        self.rounds += 1
        self.labels_learned = self.answered
        if self._refit is not None:
            self._refit_head()

    def _refit_head(self) -> None:
        assert self._refit is not None
        self.model = self._refit(self.model, [*self.samples, *self._pseudo()])
        self.model.eval()
        self._refit_at = self.answered
        self.refits += 1
        self.labels_learned = self.answered


def full_data_confusion(
    data: StreamData, config: LearnerConfig, seed: int, refit: HeadRefit | None
) -> np.ndarray:
    """Test counts of the same learner given every training label in one long round.

    One frame per image (a video burst is one image), at least 600 steps and
    10 epochs, then the head refit when the runs use refits.
    """
    import torch

    from trainer.finetune import finetune_round
    from trainer.samples import Sample

    torch.set_num_threads(1)
    model = build(data, seed)
    train = [Sample(str(i), data.inputs[i], int(data.labels[i])) for i in data.images]
    steps = config.full_steps or max(600, 10 * len(train) // 32)
    finetune = finetune_config(
        data,
        seed,
        epochs=10,
        max_steps=steps,
        min_steps=steps,
        replay_min=0,
        shrink=config.shrink,
        perturb=config.perturb,
        class_balance=config.class_balance,
        lr_schedule=config.lr_schedule,
        train_precision=config.train_precision,
    )
    finetune_round(model, train, [], finetune, torch.device("cpu"))
    if refit is not None:
        model = refit(model, train)
    probs, _ = forward(model, data.test_inputs)
    return confusion(data.test_labels, probs.argmax(axis=1), len(data.classes))
