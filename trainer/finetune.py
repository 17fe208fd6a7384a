"""Continuous fine-tuning: each round starts from the current weights.

AIFT (Zhou et al., CVPR 2017) fine-tunes the current model on the labels
gathered so far instead of restarting from the pretrained one each time; the
first author notes that this keeps what was learned and costs far less, but
needs a smaller learning rate. Its journal version (Zhou et al., MedIA 2021,
"Active, continual fine tuning of convolutional neural networks") answers
forgetting by training each round on the new labels plus a replay of earlier
ones, favouring those the current model gets wrong. ``finetune_round`` does
that: all new samples, plus up to ``replay_ratio`` times as many earlier ones,
drawn without replacement with weight ``hard_replay_weight`` for samples the
model currently misclassifies and 1 for the others.

For the small CNN (``shrink`` and ``perturb``; see ``FinetuneConfig.for_arch``), a round
that trains on every label there is (each earlier one replayed, or none yet) first
shrinks the weights towards zero and perturbs them:
Ash and Adams ("On warm-starting neural network training", NeurIPS 2020) found that a
network warm-started from the solution on part of the data generalizes worse than one
trained afresh on all of it, and that ``θ ← λθ + ε, ε ~ N(0, σ²)`` before training on
all of it closes the gap while keeping most of the warm start's speed. An active
learner's rounds are exactly such a sequence, and its early labels (a coverage cold
start) differ from its later ones (the decision boundary). With 200 steps a round it
helped the small CNN on digits and cost it accuracy on PneumoniaMNIST as video from 100
labels on; with 400 steps a round (``for_arch``) the loss went and the gain stayed (see
the README's Benchmarks).
"""

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.errors import DeviceError
from trainer.forward import EVAL_BATCH, forward_eval, predicted_classes
from trainer.samples import Sample, stack

log = logging.getLogger(__name__)

_SMALL_ARCHS = frozenset({"small-cnn"})
SMALL_CNN_MIN_STEPS = 400
SMALL_CNN_SHRINK = 0.6
SMALL_CNN_PERTURB = 0.01
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
BF16_ARCHS = frozenset({"small-cnn", "resnet18"})
"""Architectures whose rounds ``auto`` trains in bfloat16 on a CPU with AMX. A step on 32
images on one thread (a scratch loop, 8 steps after 3, twice each; beside a two-worker
benchmark for the 96x96 ones) took 9.7 to 10.0 ms instead of 18.5 to 20.4 for the small
CNN at 28x28, and 537 to 558 ms instead of 1,026 to 1,082 for ResNet-18 at 96x96.
Depthwise convolutions run slower in bfloat16 there: EfficientNet-Lite0 1,375 to 1,434 ms
instead of 923 to 968, MobileNetV3-Small 455 to 473 instead of 219 to 245, so those stay
float32 (docs/benchmarks.md, "Training in bfloat16")."""


@dataclass(frozen=True)
class FinetuneConfig:
    """How one fine-tuning round trains.

    Attributes:
        optimizer: ``adamw`` (default), ``adam`` or ``sgd`` (momentum 0.9); a
            fresh optimizer per round, so checkpoints carry no optimizer state.
        lr: learning rate; ``for_arch`` picks 1e-3 for the small CNN trained
            from scratch and 1e-4 for torchvision backbones, whose (possibly
            pretrained) features a large step would destroy.
        lr_schedule: ``constant`` keeps ``lr`` for the whole round; ``cosine`` lowers
            it from ``lr`` to 0 over the round's steps (half a cosine), so that a
            round ends where its last steps settle rather than wherever its last
            few batches happened to push the weights.
        train_precision: the training steps' arithmetic (the weights and the optimizer
            stay float32 either way, and so do evaluation and the export): ``bf16`` runs
            the forward and backward passes under autocast in bfloat16; ``fp32`` does
            not; ``auto`` (the default) is ``bf16`` on a CPU with AMX's bfloat16 tiles
            (oneDNN then runs the convolutions on them, twice as fast for the small CNN
            at 28x28) and ``fp32`` anywhere else (see :func:`training_dtype`);
            ``for_arch`` makes it ``fp32`` for architectures that bfloat16 slows down
            (:data:`BF16_ARCHS`).
        weight_decay: decoupled for AdamW, L2 for the others.
        batch_size: samples per step.
        epochs: passes over (new + replay) per round.
        min_steps: at least this many steps per round, so that a small round
            (say 50 labels, two batches) still moves the weights.
        max_steps: at most this many steps per round, whatever the epochs say.
        replay_ratio: replay up to this many earlier samples per new one: with the
            default every earlier label is replayed until the pool passes
            ``replay_max`` (a few hundred labels train in seconds; replaying a
            fraction measured worse in ``winnow bench label-efficiency``).
        replay_min: replay at least this many earlier samples (when the pool
            has them), so a round of one label still trains on real batches.
        replay_max: never replay more than this many per round.
        replay_candidates: the model scores at most this many pool samples
            (a random subset) to find the misclassified ones.
        hard_replay_weight: sampling weight of a pool sample the current model
            misclassifies, against 1 for one it gets right.
        augment: random translation, scale, brightness and contrast.
        translate: largest shift, as a fraction of the image side.
        scale: largest zoom in or out, as a fraction (0.1 = 0.9x to 1.1x).
        brightness: largest additive shift, in normalized units.
        contrast: largest multiplicative change around each image's mean.
        flip: also flip horizontally (off: digits and X-rays are not
            mirror-symmetric).
        label_smoothing: of the cross-entropy loss.
        max_grad_norm: clip the gradient norm; ``None`` to not clip.
        freeze_batchnorm: keep BatchNorm statistics fixed (eval mode) while
            training, e.g. for a pretrained backbone and small rounds. Batches
            of one sample always run BatchNorm in eval mode.
        shrink: before a round on every label (each earlier one replayed), each
            weight is multiplied by this (1: not shrunk); see the module docstring.
        perturb: and gets Gaussian noise of this standard deviation (0: none).
        class_balance: the loss weighs each class by ``(n̄ / n_k) ** class_balance``,
            ``n_k`` its samples in the round and ``n̄`` their mean over the classes present
            (0: unweighted; 1: every class weighs as much in total, which is what balanced
            accuracy asks of an imbalanced stream).
        seed: with the round's sizes, seeds replay choice, shuffling,
            augmentation and dropout; a fixed seed gives the same weights on
            CPU.
    """

    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    lr_schedule: Literal["constant", "cosine"] = "constant"
    train_precision: Literal["auto", "fp32", "bf16"] = "auto"
    weight_decay: float = 1e-2
    batch_size: int = 32
    epochs: int = 3
    min_steps: int = 100
    max_steps: int = 500
    replay_ratio: float = 50.0
    replay_min: int = 32
    replay_max: int = 2048
    replay_candidates: int = 8192
    hard_replay_weight: float = 4.0
    augment: bool = True
    translate: float = 0.0625
    scale: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    flip: bool = False
    label_smoothing: float = 0.05
    max_grad_norm: float | None = 5.0
    freeze_batchnorm: bool = False
    shrink: float = 1.0
    perturb: float = 0.0
    class_balance: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 1:
            raise ValueError("lr must be positive, batch_size and epochs at least 1")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"lr_schedule must be 'constant' or 'cosine', not {self.lr_schedule!r}"
            )
        if self.train_precision not in TRAIN_PRECISIONS:
            raise ValueError(
                f"train_precision must be one of {', '.join(TRAIN_PRECISIONS)}, "
                f"not {self.train_precision!r}"
            )
        if self.min_steps < 0 or self.max_steps < 1:
            raise ValueError("min_steps must be 0 or more and max_steps at least 1")
        if self.hard_replay_weight <= 0 or self.replay_ratio < 0:
            raise ValueError("hard_replay_weight must be positive and replay_ratio not negative")
        if not 0 < self.shrink <= 1 or self.perturb < 0:
            raise ValueError("shrink must be in (0, 1] and perturb not negative")
        if not 0 <= self.class_balance <= 1:
            raise ValueError("class_balance must be in [0, 1]")

    @classmethod
    def for_arch(cls, arch: str, **overrides: object) -> "FinetuneConfig":
        """Defaults for an architecture: a smaller step for torchvision backbones; for
        the small CNN trained from scratch, shrink and perturb (module docstring) by 0.6
        and 0.01 before each round on every label, and at least 400 steps a round.

        Measured with ``winnow bench label-efficiency`` (10 paired seeds; 5 for digits
        as video), against 200 steps without shrinking: to 95 % of full-data accuracy
        the default policy needed 59 labels instead of 94 on digits (random sampling 99
        instead of 140), 142 instead of 241 on digits as video (to a higher target), and
        on PneumoniaMNIST as video it was level (paired accuracy at 200 labels −0.010
        [−0.043, 0.019]); with 200 steps after the shrink it lost 4.3 points there.
        (100 steps without it had left the small CNN short of what its labels could
        teach it: 158 labels for random sampling on digits, 138 with 200.) A pretrained
        or torchvision backbone is not shrunk: it would wear the ImageNet features away
        round after round. ``shrink=1, perturb=0`` turns it off.

        Pretrained EfficientNet-Lite0 keeps its ImageNet BatchNorm statistics: its
        TensorFlow-style momentum (0.01) barely moves them on a few dozen labels,
        and frozen statistics measured better on held-out photo patches (1.0 vs 0.98).

        An override of None means the architecture's default (a setting left unset).
        """
        lr = 1e-3 if arch in _SMALL_ARCHS else 1e-4
        given = {key: value for key, value in overrides.items() if value is not None}
        fields: dict[str, object] = {"lr": lr, **given}
        if arch in _SMALL_ARCHS:
            fields.setdefault("min_steps", SMALL_CNN_MIN_STEPS)
            fields.setdefault("shrink", SMALL_CNN_SHRINK)
            fields.setdefault("perturb", SMALL_CNN_PERTURB)
        if arch == "efficientnet_lite0":
            fields.setdefault("freeze_batchnorm", True)
        if fields.get("train_precision", "auto") == "auto" and arch not in BF16_ARCHS:
            fields["train_precision"] = "fp32"
        return cls(**fields)  # type: ignore[arg-type]

    def replay_count(self, new: int, pool: int) -> int:
        """How many earlier samples a round with ``new`` samples replays."""
        wanted = max(math.ceil(self.replay_ratio * new), self.replay_min)
        return max(0, min(wanted, self.replay_max, pool))


@dataclass(frozen=True)
class RoundStats:
    """What one round did.

    Attributes:
        new: new samples trained on.
        replayed: earlier samples replayed.
        replayed_hard: of those, how many the model misclassified before the round.
        steps: optimizer steps.
        loss: mean training loss of the last epoch.
        seconds: wall time of the round.
        shrunk: the weights were shrunk and perturbed before it.
    """

    new: int
    replayed: int
    replayed_hard: int
    steps: int
    loss: float
    seconds: float
    shrunk: bool = False


def select_device(pref: Literal["auto", "cpu", "cuda"] = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU.

    Raises:
        DeviceError: ``cuda`` was asked for and there is none.
    """
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device 'cuda' was requested but no CUDA GPU is available")
        return torch.device("cuda")
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raise DeviceError(f"unknown device '{pref}'; choose auto, cpu or cuda")


def predict_proba(
    model: nn.Module, inputs: np.ndarray, device: torch.device, batch_size: int = EVAL_BATCH
) -> np.ndarray:
    """Class probabilities (N x classes) in eval mode; restores the model's mode."""
    model.to(device)
    outputs = forward_eval(model, inputs, device, batch_size)
    return outputs[0] if outputs else np.zeros((0, 0), dtype=np.float32)


def select_replay(
    model: nn.Module,
    pool: Sequence[Sample],
    count: int,
    config: FinetuneConfig,
    device: torch.device,
    rng: np.random.Generator,
) -> tuple[list[Sample], int]:
    """Draws ``count`` pool samples, favouring those the model gets wrong.

    Returns:
        The chosen samples and how many of them the model misclassified.
    """
    if count <= 0 or not pool:
        return [], 0
    candidates = np.arange(len(pool))
    if len(pool) > config.replay_candidates:
        candidates = rng.choice(len(pool), size=config.replay_candidates, replace=False)
    predicted, labels = predicted_classes(model, [pool[int(i)] for i in candidates], device)
    wrong = predicted != labels
    weights = np.where(wrong, config.hard_replay_weight, 1.0)
    count = min(count, len(candidates))
    picked = rng.choice(len(candidates), size=count, replace=False, p=weights / weights.sum())
    return [pool[int(candidates[i])] for i in picked], int(wrong[picked].sum())


def augment_batch(x: Tensor, config: FinetuneConfig, gen: torch.Generator) -> Tensor:
    """Random translation, scale, brightness/contrast (and flip) on normalized inputs.

    One affine resampling does shift and zoom per sample; the border pixels
    extend outwards, so a shifted digit sees its own background, not gray.
    """
    n = x.shape[0]

    def uniform(low: float, high: float) -> Tensor:
        return torch.rand(n, generator=gen) * (high - low) + low

    zoom = uniform(1.0 - config.scale, 1.0 + config.scale)
    # affine_grid works in [-1, 1]: a shift of a fraction f of the side is 2f.
    shift_x = uniform(-2 * config.translate, 2 * config.translate)
    shift_y = uniform(-2 * config.translate, 2 * config.translate)
    sign = torch.ones(n)
    if config.flip:
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = zoom * sign
    theta[:, 1, 1] = zoom
    theta[:, 0, 2] = shift_x
    theta[:, 1, 2] = shift_y
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gain = uniform(1.0 - config.contrast, 1.0 + config.contrast).to(x.device)
    offset = uniform(-config.brightness, config.brightness).to(x.device)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * gain.view(-1, 1, 1, 1) + mean + offset.view(-1, 1, 1, 1)


def finetune_round(
    model: nn.Module,
    new: Sequence[Sample],
    replay_pool: Sequence[Sample],
    config: FinetuneConfig,
    device: torch.device,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> RoundStats:
    """Fine-tunes ``model`` in place on ``new`` plus a replay of ``replay_pool``.

    Continues from the model's current weights (never re-initializes). The
    model must have ``logits(x) -> (logits, embedding)`` (a ``WinnowNet``).
    The model is left in eval mode on ``device``.

    Args:
        model: the model to train.
        new: the labels that arrived since the last round.
        replay_pool: earlier labeled samples (not including ``new``).
        config: training settings.
        device: where to train.
        progress: called after each epoch with ``{epoch, loss, seconds}``.
    """
    started = time.perf_counter()
    seeds = np.random.SeedSequence([config.seed, len(replay_pool), len(new)])
    rng = np.random.default_rng(seeds)
    torch_seed, noise_seed = (
        int(word & 0x7FFF_FFFF_FFFF_FFFF) for word in seeds.generate_state(2, dtype=np.uint64)
    )
    model.to(device)
    count = config.replay_count(len(new), len(replay_pool))
    replay, hard = select_replay(model, replay_pool, count, config, device, rng)
    samples = [*new, *replay]
    if not samples:
        model.eval()
        return RoundStats(0, 0, 0, 0, math.nan, time.perf_counter() - started)
    # A round on all the labels there are: shrunk and perturbed first (not when part of
    # them is left out of the replay, whose knowledge lives only in the weights).
    shrunk = len(replay) == len(replay_pool) and (config.shrink != 1.0 or config.perturb > 0)
    if shrunk:
        shrink_perturb(model, config.shrink, config.perturb, seed=noise_seed)
    inputs, labels = stack(samples)
    x_all = torch.from_numpy(inputs)
    y_all = torch.from_numpy(labels)
    classes = model.num_classes  # a WinnowNet
    weights = class_weights(labels, int(classes), config.class_balance)  # type: ignore[arg-type]
    class_weight = None if weights is None else torch.from_numpy(weights).to(device)
    gen = torch.Generator().manual_seed(torch_seed)
    optimizer = _make_optimizer(model, config)
    batches = _batches_per_epoch(len(samples), config.batch_size)
    epochs = max(config.epochs, math.ceil(config.min_steps / batches))
    schedule = _schedule(optimizer, config, min(config.max_steps, epochs * batches))
    steps, loss = 0, math.nan
    dtype = training_dtype(config.train_precision, device)
    devices = [device] if device.type == "cuda" else []
    # Dropout draws from torch's global generator: fork it so a round is
    # reproducible without changing the caller's random state.
    with channels_last(model, device) as layout, torch.random.fork_rng(devices=devices):
        torch.manual_seed(torch_seed)
        for epoch in range(epochs):
            epoch_started = time.perf_counter()
            losses: list[float] = []
            for index in _epoch_order(len(samples), config.batch_size, gen):
                if steps >= config.max_steps:
                    break
                x, y = x_all[index], y_all[index]
                if config.augment:
                    x = augment_batch(x, config, gen)
                if layout is not None and x.dim() == 4:
                    x = x.contiguous(memory_format=layout)
                losses.append(
                    _step(model, optimizer, x.to(device), y.to(device), config, class_weight, dtype)
                )
                steps += 1
                if schedule is not None:
                    schedule.step()
            if not losses:
                break
            loss = float(np.mean(losses))
            if progress is not None:
                progress(
                    {
                        "epoch": epoch + 1,
                        "loss": loss,
                        "seconds": time.perf_counter() - epoch_started,
                    }
                )
    model.eval()
    stats = RoundStats(
        new=len(new),
        replayed=len(replay),
        replayed_hard=hard,
        steps=steps,
        loss=loss,
        seconds=time.perf_counter() - started,
        shrunk=shrunk,
    )
    log.info(
        "finetune round new=%d replayed=%d replayed_hard=%d shrunk=%s steps=%d loss=%.4f "
        "seconds=%.2f train_precision=%s",
        stats.new,
        stats.replayed,
        stats.replayed_hard,
        stats.shrunk,
        stats.steps,
        stats.loss,
        stats.seconds,
        "fp32" if dtype is None else "bf16",
    )
    return stats


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX's bfloat16 tiles (Intel Sapphire Rapids and later), on
    which oneDNN runs bfloat16 convolutions and matrix products several times faster
    than float32. Without them bfloat16 is emulated or runs on AVX-512 at about float32's
    speed, so ``auto`` stays ``fp32``."""
    try:
        capabilities = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):  # a torch without the probe
        return False
    return bool(capabilities.get("amx_bf16", False))


def training_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a round's training steps at ``precision`` (``train_precision``),
    or None for float32.

    ``auto`` is bfloat16 on a CPU with AMX (:func:`cpu_has_amx_bf16`) and float32
    elsewhere, CUDA included (bfloat16 there is not measured yet: ask for ``bf16``);
    ``FinetuneConfig.for_arch`` has already made it ``fp32`` for the architectures
    bfloat16 slows down (:data:`BF16_ARCHS`). On the small CNN at 8x8 (digits) a step is
    no faster (3.2 against 3.3 ms): the tiles do not pay at that size.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(
            f"train_precision must be one of {', '.join(TRAIN_PRECISIONS)}, not {precision!r}"
        )
    return torch.bfloat16 if device.type == "cpu" and cpu_has_amx_bf16() else None


@contextlib.contextmanager
def channels_last(model: nn.Module, device: torch.device) -> Iterator[torch.memory_format | None]:
    """On the CPU, ``model``'s 4-d weights channels last inside the block (the default
    layout again after it); yields the layout its image inputs should take, or None
    (another device: the model is left as it is).

    oneDNN's pooling and BatchNorm kernels run several times faster on this layout: a
    training step of the small CNN on a batch of 32 28x28 images took 21 to 23 ms of one
    core instead of 30 to 38, and a PneumoniaMNIST strategy and seed in ``winnow bench
    label-efficiency`` 91 to 94 s instead of 125 to 128 (docs/benchmarks.md, "Channels
    last"). The values are the same up to rounding.
    """
    if device.type != "cpu":
        yield None
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield torch.channels_last
    finally:
        model.to(memory_format=torch.contiguous_format)


def class_weights(labels: np.ndarray, num_classes: int, power: float) -> np.ndarray | None:
    """Per-class loss weights ``(n̄ / n_k) ** power`` (float32, ``num_classes`` of them) for
    samples with these labels; a class without a sample gets 1. None when ``power`` is 0 or
    every present class has as many samples (the weights would all be 1)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    present = counts > 0
    if power == 0 or not present.any() or counts[present].min() == counts[present].max():
        return None
    weights = np.ones(num_classes)
    weights[present] = (counts[present].mean() / counts[present]) ** power
    return weights.astype(np.float32)


def shrink_perturb(model: nn.Module, shrink: float, perturb: float, seed: int) -> None:
    """Every parameter ``θ ← shrink · θ + ε``, ``ε ~ N(0, perturb²)`` drawn from ``seed``
    (on the CPU, so a seed gives the same noise on any device); buffers (BatchNorm's
    running statistics) are left as they are."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(shrink)
            if perturb > 0:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.add_(noise.to(param.device, param.dtype), alpha=perturb)


def _make_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)


def _schedule(
    optimizer: torch.optim.Optimizer, config: FinetuneConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The round's learning-rate schedule over its ``total`` steps (None: constant)."""
    if config.lr_schedule == "constant":
        return None

    def factor(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches_per_epoch(n: int, batch_size: int) -> int:
    full, rest = divmod(n, batch_size)
    # A last batch of one sample is dropped (BatchNorm cannot train on it)
    # unless it is the only batch there is.
    return max(1, full + (1 if rest >= 2 else 0))


def _epoch_order(n: int, batch_size: int, gen: torch.Generator) -> list[Tensor]:
    order = torch.randperm(n, generator=gen)
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < 2:
        chunks.pop()
    return chunks


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    config: FinetuneConfig,
    class_weight: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> float:
    model.train()
    if config.freeze_batchnorm or len(x) < 2:
        _batchnorm_eval(model)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        logits, _ = model.logits(x)  # type: ignore[operator]
    loss = F.cross_entropy(
        logits.float(), y, weight=class_weight, label_smoothing=config.label_smoothing
    )
    loss.backward()
    if config.max_grad_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    return float(loss.detach())


def _batchnorm_eval(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
