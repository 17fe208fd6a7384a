"""One run: a strategy, a seed, a stream replayed until ``max_labels`` labels are answered.

Pairing: everything a seed fixes is the same for every strategy — the stream
order of each pass, the initial weights, the policy's and the peer's random
state, the fine-tuning seed — so two strategies of one seed differ only in
which frames they ask for.

The stream is replayed in batches of ``batch`` frames, as the scorer sees
them; a pass is a new random order of the frames not asked yet, and up to
``max_passes`` passes are made. Winnow strategies go through the scorer's own
``ScoringEngine`` (on the run's torch model, its head in the metadata as the
trainer exports it) and ``QueryPolicy``; peers through :mod:`.peers`. An
oracle answers every selected frame.
"""

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from winnow.bench.efficiency.curves import accuracy, balanced_accuracy, recalls
from winnow.bench.efficiency.learner import Learner, LearnerConfig, trainer_head_refit
from winnow.bench.efficiency.specs import StrategySpec
from winnow.bench.efficiency.stream import StreamData, stream_pass


@dataclass(frozen=True)
class RunConfig:
    """What every run of a benchmark shares.

    Attributes:
        budget: fraction of frames that may be selected over any ``window`` frames.
        window: frames of the sliding budget window.
        batch: frames per scoring batch.
        max_labels: labels answered before the run stops.
        max_passes: passes over the stream at most.
        video: the stream is video bursts (passes keep bursts in order).
        learner: rounds and refits.
        head_refits: use the trainer's head refit between rounds.
    """

    budget: float = 0.05
    window: int = 200
    batch: int = 32
    max_labels: int = 200
    max_passes: int = 6
    video: bool = False
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    head_refits: bool = False


@dataclass
class RunResult:
    """The curve of one run: a point at 0 labels and after every model change.

    Attributes:
        name: the strategy.
        seed: the seed.
        labels: labels the model had learned from at each point.
        accuracy: test accuracy at each point.
        balanced_accuracy: test balanced accuracy at each point.
        recall: per-class test recall at each point.
        label_counts: at each point, the labels of each class the model had learned from
            (what the strategy sent for labeling, by true class).
        frames_seen: frames the strategy was shown.
        rounds: fine-tuning rounds.
        refits: head refits.
        seconds: wall time of the run.
    """

    name: str
    seed: int
    labels: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    balanced_accuracy: list[float] = field(default_factory=list)
    recall: list[list[float]] = field(default_factory=list)
    label_counts: list[list[int]] = field(default_factory=list)
    frames_seen: int = 0
    rounds: int = 0
    refits: int = 0
    seconds: float = 0.0

    def record(self, labels: int, counts: np.ndarray, learned: Sequence[int] = ()) -> None:
        """A point: ``labels`` learned from, the test confusion ``counts`` (C x C) and the
        true class of each label learned from (``learned``)."""
        self.labels.append(labels)
        self.accuracy.append(round(accuracy(counts), 5))
        self.balanced_accuracy.append(round(balanced_accuracy(counts), 5))
        self.recall.append([round(float(r), 4) for r in recalls(counts)])
        classes = np.bincount(np.asarray(learned, dtype=np.int64), minlength=len(counts))
        self.label_counts.append([int(n) for n in classes])


class _Served:
    """The run's torch model as the scoring engine sees a served ONNX model.

    A new one is made after every model change: the engine reads the head
    from ``metadata`` once per model object, as it does per release.
    """

    def __init__(self, learner: Learner) -> None:
        from schemas.model_spec import HEAD_KEY
        from trainer.export import head_metadata

        self._learner = learner
        head = head_metadata(learner.model)
        self.metadata = {HEAD_KEY: head} if head else {}

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._learner.run(batch)


_DATA: StreamData | None = None


def init_worker(data: StreamData) -> None:
    """Pool initializer: the stream once per process, one torch thread each, and an exit
    when the benchmark that started it is gone (:func:`exit_with_parent`)."""
    import torch

    global _DATA
    _DATA = data
    torch.set_num_threads(1)
    exit_with_parent()


PARENT_POLL_S = 1.0


def exit_with_parent() -> None:
    """Ends this process soon after its parent dies.

    A pool's workers outlive a benchmark killed by a signal it cannot handle (SIGKILL,
    or an OOM kill): they go on running their streams for up to an hour, on the CPU the
    next run measures with. A daemon thread checks every ``PARENT_POLL_S`` whether this
    process has been handed to another parent, and exits if so.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="winnow-parent-watch", daemon=True).start()


def run_one(job: tuple[str, StrategySpec, int, RunConfig]) -> RunResult:
    """Streams once for one strategy and seed (in a worker set up by :func:`init_worker`)."""
    name, spec, seed, config = job
    assert _DATA is not None, "run_one runs in a worker set up by init_worker"
    return _StreamRun(_DATA, name, spec, seed, config).run()


class _StreamRun:
    """One strategy and seed, driving the policy through the hooks the scorer calls.

    As ``service.pipeline.scorer`` does: ``on_model`` with the labels the model
    learned from after each model change; after a round, which changes the
    backbone, ``rebase`` with the new model's view of the latest frames asked
    for (the embedding strategies' memory) before the next batch is decided (a
    head refit keeps the embeddings, as a head-only release does); and
    ``on_answer`` with the predicted class and the label of every answer, which
    here comes at once.
    """

    def __init__(
        self, data: StreamData, name: str, spec: StrategySpec, seed: int, config: RunConfig
    ) -> None:
        from service.scoring.engine import ScoringEngine
        from service.selection.policy import QueryPolicy
        from winnow.bench.efficiency.peers import Peer

        self.data, self.config = data, config
        settings = spec.policy_settings(budget=config.budget, window=config.window, seed=seed)
        self.policy = QueryPolicy.from_settings(settings)
        self.engine = ScoringEngine.from_settings(settings)
        refit = trainer_head_refit(config.learner.class_balance) if config.head_refits else None
        self.learner = Learner(data, config.learner, seed, refit)
        self.peer = Peer(spec.peer, config.budget, seed, len(data.classes)) if spec.peer else None
        self.policy.on_model(labels_trained=0, classes=data.classes)
        self.served = _Served(self.learner)
        self.result = RunResult(name, seed)
        self.rng = np.random.default_rng(seed)  # the stream order: the same for every strategy
        self.asked: set[int] = set()
        self.selected: list[int] = []  # frames asked for, oldest first (the scorer's exemplars)
        self.backbone_rounds = 0  # the rounds the policy's memory was embedded after

    def run(self) -> RunResult:
        started = time.perf_counter()
        data, learner, config = self.data, self.learner, self.config
        self.result.record(0, learner.confusion(data.test_inputs, data.test_labels))
        for _ in range(config.max_passes):
            order = stream_pass(data.bursts, self.rng, self.asked, config.video)
            for start in range(0, len(order), config.batch):
                if learner.answered >= config.max_labels:
                    break
                self._batch(order[start : start + config.batch])
            if learner.answered >= config.max_labels:
                break
        if learner.flush():
            self._changed()
        self.result.rounds, self.result.refits = learner.rounds, learner.refits
        self.result.seconds = round(time.perf_counter() - started, 2)
        return self.result

    def _batch(self, chunk: np.ndarray) -> None:
        """Scores and decides one batch; the oracle answers each frame asked for."""
        from service.selection.filters import DecisionContext
        from trainer.pseudo import UNLABELED
        from trainer.samples import Sample

        data, learner, policy = self.data, self.learner, self.policy
        x = data.inputs[chunk]
        if self.peer is None or policy.cold_start:
            scored = self.engine.score(self.served, x, policy.needs)
            probs = scored.probabilities
            context = DecisionContext(scored.embeddings, probs, ["stream"] * len(x))
            rows = policy.decide(scored.scores, context)
            picked = [i for i, row in enumerate(rows) if row["selected"]]
        else:
            probs, emb = learner.run(x)
            picked = self.peer.query(probs, emb, learner.samples, learner.run)
        self.result.frames_seen += len(x)
        if self.config.learner.pseudo > 0:
            learner.unlabeled.extend(
                Sample(str(int(i)), data.inputs[int(i)], UNLABELED) for i in chunk
            )
        self.selected.extend(int(chunk[i]) for i in picked)
        for i in picked:
            if learner.answered >= self.config.max_labels:
                break
            index = int(chunk[i])
            label = int(data.labels[index])
            self.asked.add(index)
            policy.on_answer(data.classes[int(probs[i].argmax())], data.classes[label])
            if learner.add(Sample(str(index), data.inputs[index], label)):
                self._changed()

    def _changed(self) -> None:
        """A new model: measure it, tell the policy, re-embed the policy's memory."""
        data, learner, policy = self.data, self.learner, self.policy
        self.result.record(
            learner.labels_learned,
            learner.confusion(data.test_inputs, data.test_labels),
            [s.label for s in learner.samples[: learner.labels_learned]],
        )
        self.served = _Served(learner)
        policy.on_model(labels_trained=learner.labels_learned, classes=data.classes)
        # Cached features are the embeddings whatever the head: a round changes nothing there.
        new_backbone = learner.rounds != self.backbone_rounds and not data.features
        self.backbone_rounds = learner.rounds
        memory = policy.memory
        if self.peer is not None or not new_backbone:
            return
        kept = self.selected[-memory:] if memory else []
        if not kept:  # nothing to re-embed; the filters still drop the old space's rows
            policy.rebase(np.zeros((0, 0)), None)
            return
        probs, emb = learner.run(data.inputs[kept])
        policy.rebase(emb, probs)
