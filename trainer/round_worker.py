"""A backbone round's training in a child process, replaced every few rounds.

Why a process: the soak (``winnow bench soak``, README "Soak") found the trainer's RSS
growing in step with its rounds, 75 to 90 MB an hour at 80 frames/s over nine
60-minute runs, held outside Python's allocator (torch's C++ side and glibc's heaps,
not one array), and no single holder was found. Memory a process leaves behind goes
back to the system when it ends, whatever holds it. So a round's training, the part
that churns the heap most (a scratch loop of the soak trainer's work: rounds alone
18 KB a label, head refits alone 5), runs in a child that trains
``rounds_per_process`` rounds and is then replaced; the trainer keeps everything
else (evaluation, the head refit, the gate, the export), which only runs forward
passes.

Measured, it did not pay: in the tenth 60-minute soak (docs/benchmarks.md, "Soak") the
trainer's own process, no longer training, grew as fast as before (69 MB an hour), the
worker held about 400 MB more, and its rounds slowed beside the head refits on two cores.
So ``WINNOW_TRAINER_ROUND_WORKER_ROUNDS`` is 0 (off) by default; this module is what it
turns on.

What it costs: the child imports torch (about 3 s of CPU on the 2-core machine,
started right after the previous child's last round, so the next round finds it
ready), each round pickles the model in and its weights out (the small CNN a few
hundred KB, ResNet-18 45 MB), and the child holds its own copy of the pixels of the
round's frames (sent once per child, not every round; 150 KB a label at 224 x 224 RGB),
every label's, which ``WINNOW_TRAINER_SAMPLE_CACHE_MB`` (the trainer's own) does not bound.

The child trains exactly as the trainer's own thread would (:func:`finetune_round`,
same seed, same thread count: the weights come out equal). A child that dies
mid-round (killed, out of memory) is replaced and the round tried once more in a
fresh one; a second death, or an error raised by the training itself, fails the
round as an error in the trainer's own thread would.

The protocol, pickled messages over a socket pair (``multiprocessing.connection``):
the parent sends ``("round", RoundJob)``; the child answers ``("progress", dict)`` per
epoch, then ``("done", weights, RoundStats)`` or ``("failed", traceback text)``.
"""

import ctypes
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Literal

import numpy as np
import torch
from torch import nn

from schemas.model_spec import ModelSpec
from trainer.finetune import FinetuneConfig, RoundStats, finetune_round
from trainer.samples import Sample, arrays, inputs_of

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, float]], None]

StartReason = Literal["first", "recycled", "died"]
"""Why a child started: the worker's first, one replacing a child that trained its
rounds, or one replacing a child that died."""

MODULE = "trainer.round_worker"
"""What the child runs (``python -m``); this module."""

PR_SET_PDEATHSIG = 1

STOP_TIMEOUT_S = 5.0
"""How long a retired child may take to exit after its socket closes before it is killed."""


class RoundWorkerError(RuntimeError):
    """The round could not be trained in a child process."""


class WorkerDied(RoundWorkerError):
    """The child exited (or its socket broke) before it answered."""


@dataclass(frozen=True)
class RoundJob:
    """One round for the child.

    Attributes:
        model: the candidate before training, as ``torch.save`` writes a module.
        spec: the preprocessing the frames' pixels take (``Sample.spec``); None when
            the sources are normalized inputs already.
        sources: the frames the child does not hold yet, by frame id.
        new: ``(frame id, label index)`` of the new labels, in order.
        replay: the same for the replay pool.
        config: the round's training settings.
        device: where to train (``torch.device`` text).
    """

    model: bytes
    spec: ModelSpec | None
    sources: dict[str, np.ndarray]
    new: list[tuple[str, int]]
    replay: list[tuple[str, int]]
    config: FinetuneConfig
    device: str


class RoundWorker:
    """Trains rounds in a child process that a fresh one replaces every few rounds.

    :meth:`finetune` has :func:`finetune_round`'s signature and effect (the model is
    trained in place), so a round takes either. Call it from one thread at a time;
    :meth:`close` may come from any thread.
    """

    def __init__(
        self,
        rounds_per_process: int,
        threads: int | None = None,
        on_start: Callable[[StartReason], None] | None = None,
    ) -> None:
        """
        Args:
            rounds_per_process: rounds a child trains before a fresh one replaces it.
            threads: torch's intra-op threads in the child; None: this process's count.
            on_start: called with the reason each time a child starts (the trainer's
                ``winnow_trainer_round_workers_started_total``).
        """
        if rounds_per_process < 1:
            raise ValueError(f"rounds_per_process must be at least 1, not {rounds_per_process}")
        self.rounds_per_process = rounds_per_process
        self.threads = threads
        self.started = 0
        """Child processes started so far."""
        self._on_start = on_start
        self._next_reason: StartReason = "first"
        self._child: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._held: set[str] = set()
        self._rounds = 0
        self._closed = False
        self._busy = False
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The current child's process id; None when none runs."""
        child = self._child
        return None if child is None else child.pid

    def finetune(
        self,
        model: nn.Module,
        new: Sequence[Sample],
        replay_pool: Sequence[Sample],
        config: FinetuneConfig,
        device: torch.device,
        progress: Progress | None = None,
    ) -> RoundStats:
        """:func:`finetune_round` in the child: ``model`` comes back trained, in eval mode
        on ``device``.

        Raises:
            RoundWorkerError: the child died twice, training raised in it, or the worker
                is closed.
        """
        with self._lock:
            if self._closed:
                raise RoundWorkerError("the round worker is closed")
            self._busy = True
        try:
            return self._finetune(model, new, replay_pool, config, device, progress)
        finally:
            with self._lock:
                self._busy = False
                closed = self._closed
            if closed:  # close() came meanwhile and left the socket to this thread
                self._discard()

    def close(self) -> None:
        """Kills the child at once (a round training in it fails with
        :class:`RoundWorkerError`); later calls to :meth:`finetune` raise."""
        with self._lock:
            self._closed = True
            child, busy = self._child, self._busy
        if child is not None and child.poll() is None:
            child.kill()  # wakes a round waiting on its socket with end-of-file
        if not busy:  # else the round's thread closes the socket: one thread uses it
            self._discard()

    def _finetune(
        self,
        model: nn.Module,
        new: Sequence[Sample],
        replay_pool: Sequence[Sample],
        config: FinetuneConfig,
        device: torch.device,
        progress: Progress | None,
    ) -> RoundStats:
        for attempt in (1, 2):
            self._ensure_child()
            job = self._job(model, new, replay_pool, config, device)  # what this child lacks
            try:
                stats, weights = self._train(job, progress)
            except WorkerDied as died:
                self._discard()
                self._next_reason = "died"
                if attempt == 2 or self._closed:
                    raise
                log.warning("round worker died (%s); training the round in a fresh one", died)
                continue
            state = torch.load(io.BytesIO(weights), map_location=device, weights_only=True)
            model.load_state_dict(state)
            model.to(device)
            model.eval()
            self._rounds += 1
            if self._rounds >= self.rounds_per_process:
                self._discard()
                self._next_reason = "recycled"
                self._ensure_child()  # it imports while the trainer gates and exports
            return stats
        raise AssertionError("unreachable")

    # -- the child's lifecycle -------------------------------------------------------------

    def _ensure_child(self) -> None:
        with self._lock:
            if self._closed:
                raise RoundWorkerError("the round worker is closed")
            if self._child is not None:
                return
            ours, theirs = socket.socketpair()
            threads = self.threads or torch.get_num_threads()
            level = logging.getLogger().getEffectiveLevel()
            try:
                child = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        MODULE,
                        *map(str, (theirs.fileno(), threads, level, os.getpid())),
                    ],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                )
            except OSError:
                ours.close()
                raise
            finally:
                theirs.close()
            self._child, self._conn = child, Connection(ours.detach())
            self._held, self._rounds = set(), 0
            self.started += 1
            reason = self._next_reason  # "first" until a child retires or dies
        log.debug("round worker started (%s): pid %d", reason, child.pid)
        if self._on_start is not None:
            self._on_start(reason)

    def _discard(self) -> None:
        """Closes the socket (the child exits when it reads its end) and reaps the child."""
        with self._lock:
            child, conn = self._child, self._conn
            self._child, self._conn, self._held = None, None, set()
        if conn is not None:
            conn.close()
        if child is None:
            return
        try:
            child.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # training: it would only notice at the next epoch
            child.kill()
            child.wait()

    # -- one round -------------------------------------------------------------------------

    def _train(self, job: RoundJob, progress: Progress | None) -> tuple[RoundStats, bytes]:
        conn, child = self._conn, self._child
        if conn is None or child is None:
            raise WorkerDied("the round worker was stopped")
        try:
            conn.send(("round", job))
            while True:
                kind, *payload = conn.recv()
                if kind == "progress":
                    if progress is not None:
                        progress(payload[0])
                    continue
                break
        except (EOFError, OSError) as error:
            code = child.poll()
            said = f"exit code {code}" if code is not None else f"{type(error).__name__}"
            raise WorkerDied(f"pid {child.pid}, {said}") from error
        self._held = {frame_id for frame_id, _ in (*job.new, *job.replay)}
        if kind == "failed":
            raise RoundWorkerError(f"training the round failed in the round worker:\n{payload[0]}")
        if kind != "done":
            raise RoundWorkerError(f"the round worker answered {kind!r}")
        weights, stats = payload
        return stats, weights

    def _job(
        self,
        model: nn.Module,
        new: Sequence[Sample],
        replay_pool: Sequence[Sample],
        config: FinetuneConfig,
        device: torch.device,
    ) -> RoundJob:
        samples = [*new, *replay_pool]
        spec = samples[0].spec if samples else None
        if spec is not None and any(s.spec is not spec for s in samples):
            spec = None  # mixed preprocessing: send normalized inputs (rounds never do)
        if spec is not None:  # pixels, those the child has not been sent yet
            todo = [s for s in samples if s.frame_id not in self._held]
            sources = dict(zip((s.frame_id for s in todo), arrays(todo), strict=True))
        else:
            sources = dict(zip((s.frame_id for s in samples), inputs_of(samples), strict=True))
        if spec is None:
            self._held = set()  # the child's cache holds pixels only under a spec
        buffer = io.BytesIO()
        torch.save(model, buffer)
        return RoundJob(
            model=buffer.getvalue(),
            spec=spec,
            sources=sources,
            new=[(s.frame_id, s.label) for s in new],
            replay=[(s.frame_id, s.label) for s in replay_pool],
            config=config,
            device=str(device),
        )


# -- the child -----------------------------------------------------------------------------


def serve(conn: Connection) -> None:
    """The child's loop: trains each round it is sent until its socket closes."""
    held: dict[str, np.ndarray] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        kind, job = message
        if kind != "round":
            raise ValueError(f"round worker: unknown message {kind!r}")
        try:
            answer = _round(job, held, lambda p: conn.send(("progress", p)))
        except (BrokenPipeError, ConnectionResetError):
            return  # the trainer is gone
        except Exception:
            answer = ("failed", traceback.format_exc())
        try:
            conn.send(answer)
        except OSError:
            return


def _round(job: RoundJob, held: dict[str, np.ndarray], progress: Progress) -> tuple:
    if job.spec is None:
        held.clear()
    held.update(job.sources)
    wanted = {frame_id for frame_id, _ in (*job.new, *job.replay)}
    for frame_id in [f for f in held if f not in wanted]:  # what the trainer no longer sends
        del held[frame_id]
    new = [Sample(f, held[f], label, job.spec) for f, label in job.new]
    replay = [Sample(f, held[f], label, job.spec) for f, label in job.replay]
    device = torch.device(job.device)
    model = torch.load(io.BytesIO(job.model), map_location=device, weights_only=False)
    stats = finetune_round(model, new, replay, job.config, device, progress=progress)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return ("done", buffer.getvalue(), stats)


def _die_with(parent: int) -> None:
    """Asks Linux to kill this process when its parent dies (``PR_SET_PDEATHSIG``): a
    trainer SIGKILLed mid-round takes its round worker with it at once, rather than at
    the round's next epoch, when the worker finds its socket closed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the closed socket ends it instead
        return
    if os.getppid() != parent:  # it died before the request
        os._exit(1)


def main(argv: Sequence[str]) -> int:
    """``python -m trainer.round_worker FD THREADS LOG_LEVEL PARENT_PID``, started by
    :class:`RoundWorker`."""
    from infra.allocator import tune_allocator, tune_for_training

    fd, threads, level, parent = (int(a) for a in argv)
    _die_with(parent)
    tune_allocator()
    tune_for_training()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    torch.set_num_threads(threads)
    log.debug("round worker %d ready (%d threads)", os.getpid(), threads)
    serve(Connection(fd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
