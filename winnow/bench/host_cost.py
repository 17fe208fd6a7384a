"""The scorer's host cost: its own CPU time, from the OS, and a breakdown by stage.

Two parts, both read inside the scorer's process (``winnow.bench.scorer_process``):

- :class:`CpuClock` reads the process's user + system time (``getrusage``) and
  every thread's CPU time (``/proc/self/task/<tid>/schedstat``, nanoseconds,
  Linux only), so a window's CPU can be split by thread, and the profiler's own
  thread left out;
- :class:`StageSampler` is a statistical profiler: a thread that looks at every
  Python thread's stack every few milliseconds and names the stage it is in
  (:data:`STAGES`) from the files on the stack, or ``idle`` when the thread
  waits (the event loop in ``select``, a pool worker waiting for work).

:func:`stage_breakdown` then shares each thread's measured CPU time among the
stages in proportion to that thread's busy samples. Threads Python does not
know (ONNX Runtime's intra-op pool) are counted as inference. A sample cannot
tell a thread that runs from one that waits for the GIL, so the shares within
one thread are estimates; the totals per thread are the OS's.
"""

import resource
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

STAGES = ("fetch", "decode", "infer", "decide", "deliver", "commit", "account", "kafka_io", "other")
"""``kafka_io``: aiokafka's connections (socket reads and writes, response parsing) serving any
request; ``account``: counting delivered batches (metrics, the predictions hook); ``other``: the
event loop itself, the scorer's stage glue, garbage collection, threads that ended."""

# (stage, path fragments): the innermost frame on a stack that matches names its stage.
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "decode",
        (
            "/service/pipeline/decode.py",
            "/service/pipeline/dali_decode.py",
            "/schemas/pixels.py",
            "/PIL/",
            "/nvidia/dali/",
        ),
    ),
    ("infer", ("/service/model/inference.py", "/service/scoring/", "/onnxruntime/")),
    ("decide", ("/service/selection/", "/service/pipeline/exemplars.py")),
    (
        "deliver",
        (
            "/service/pipeline/records.py",
            "/schemas/dead_letter.py",
            "/infra/kafka/delivery.py",
            "/aiokafka/producer/",
        ),
    ),
    (
        "commit",
        (
            "/service/pipeline/checkpoint.py",
            "/infra/kafka/offsets.py",
            "/service/pipeline/cap_shares.py",
        ),
    ),
    ("account", ("/service/pipeline/accounting.py",)),
    (
        "fetch",
        (
            "/service/pipeline/batching.py",
            "/schemas/frames.py",
            "/aiokafka/consumer/fetcher.py",
            "/aiokafka/consumer/consumer.py",
        ),
    ),
)
# Matched only when no rule above matches anywhere on the stack.
_FALLBACK: tuple[tuple[str, tuple[str, ...]], ...] = (("kafka_io", ("/aiokafka/",)),)
# (file suffix, function) of an innermost frame that means the thread waits.
_IDLE = (
    ("selectors.py", "select"),
    ("concurrent/futures/thread.py", "_worker"),
    ("threading.py", "wait"),
    ("queue.py", "get"),
)


def _rusage_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _thread_cpu_s() -> dict[int, float]:
    """CPU seconds of every live thread of this process, by native thread id."""
    out = {}
    for task in Path("/proc/self/task").glob("*"):
        try:
            out[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile, or no schedstat here
    return out


@dataclass(frozen=True)
class CpuSnapshot:
    process_s: float
    threads_s: dict[int, float]


class CpuClock:
    """Snapshots of the process's and its threads' CPU time."""

    @staticmethod
    def snapshot() -> CpuSnapshot:
        return CpuSnapshot(_rusage_s(), _thread_cpu_s())

    @staticmethod
    def per_thread(start: CpuSnapshot, end: CpuSnapshot) -> dict[int, float]:
        """CPU seconds each thread used between two snapshots (a new thread from zero)."""
        return {
            tid: max(0.0, seconds - start.threads_s.get(tid, 0.0))
            for tid, seconds in end.threads_s.items()
        }


def thread_names(tids: list[int]) -> dict[int, str]:
    """Python's name of each thread; ``native`` for threads Python did not start."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    return {tid: names.get(tid, "native") for tid in tids}


def classify(frame: FrameType | None) -> str:
    """The stage of a stack given its innermost frame, or ``idle``."""
    if frame is None:
        return "idle"
    code = frame.f_code
    for suffix, function in _IDLE:
        if code.co_name == function and code.co_filename.endswith(suffix):
            return "idle"
    fallback = None
    while frame is not None:
        path = frame.f_code.co_filename
        for stage, fragments in _RULES:
            if any(fragment in path for fragment in fragments):
                return stage
        if fallback is None:
            fallback = next(
                (stage for stage, parts in _FALLBACK if any(p in path for p in parts)), None
            )
        frame = frame.f_back
    return fallback or "other"


class StageSampler:
    """Counts, per Python thread, how many samples found it in each stage.

    Args:
        interval_s: time between samples.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        self._interval_s = interval_s
        self._running = threading.Event()
        self._stop = threading.Event()
        self.counts: dict[int, Counter[str]] = {}  # native thread id -> stage -> samples
        self.samples = 0
        self._thread = threading.Thread(target=self._run, name="winnow-bench-sampler", daemon=True)
        self.native_id: int | None = None

    def start(self) -> None:
        """Starts the thread, not yet sampling (see :meth:`resume`)."""
        self._thread.start()
        while self.native_id is None:
            time.sleep(0.001)

    def resume(self) -> None:
        self._running.set()

    def pause(self) -> None:
        self._running.clear()

    def stop(self) -> None:
        self._stop.set()
        self._running.set()
        self._thread.join()

    def _run(self) -> None:
        self.native_id = threading.get_native_id()
        own = threading.get_ident()
        while not self._stop.is_set():
            self._running.wait()
            if self._stop.is_set():
                return
            natives = {t.ident: t.native_id for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                native = natives.get(ident)
                if ident == own or native is None:
                    continue
                self.counts.setdefault(native, Counter())[classify(frame)] += 1
            self.samples += 1
            time.sleep(self._interval_s)


def _native_stage(tid: int) -> str:
    """The stage of a thread Python did not start: NVIDIA DALI's workers (named ``[DALI]...``)
    decode; the rest are onnxruntime's own thread pool."""
    try:
        name = Path(f"/proc/self/task/{tid}/comm").read_text()
    except OSError:
        return "infer"  # ended meanwhile: most such threads are onnxruntime's
    return "decode" if name.startswith("[DALI]") else "infer"


def stage_breakdown(
    per_thread_s: dict[int, float], counts: dict[int, Counter[str]], process_s: float
) -> dict[str, float]:
    """CPU seconds per stage: each thread's time shared by its busy samples.

    Args:
        per_thread_s: CPU seconds per native thread id in the window (the sampler's left out).
        counts: the sampler's samples per thread and stage.
        process_s: the process's CPU in the window (the sampler's left out); what the threads
            do not account for (threads that ended) is ``other``.
    """
    stages = dict.fromkeys(STAGES, 0.0)
    python_threads = {t.native_id for t in threading.enumerate()} | set(counts)
    for tid, seconds in per_thread_s.items():
        busy = {s: n for s, n in counts.get(tid, Counter()).items() if s != "idle"}
        total = sum(busy.values())
        if tid not in python_threads:
            stages[_native_stage(tid)] += seconds
        elif total == 0:
            stages["other"] += seconds
        else:
            for stage, n in busy.items():
                stages[stage] += seconds * n / total
    stages["other"] += max(0.0, process_s - sum(per_thread_s.values()))
    return stages
