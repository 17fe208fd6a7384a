"""One BLAS thread while a scorer or a trainer runs.

numpy's OpenBLAS starts a thread per core and, after each call, keeps those
threads spinning for a while in case another call follows. The scorer's matrix
products are small (a frame's embedding against the kept ones, frame by frame,
in the embedding strategies, the stream filters and the drift detectors) and
come many times a batch, while its decode and inference threads already use
every core. On 2 cores the spinning threads took more than half of the
scorer's CPU time and slowed every other stage (``winnow bench throughput``,
``threads_cpu_ms_per_frame``: the ``native`` threads); one thread computes
these products at once.

The trainer's head refits are the same kind of product, larger: every label's
embedding against the head, a few hundred times a fit. Beside a busy scorer two
BLAS threads made them several times slower than one (300 products of 5,000 ×
128 by 128 × 10: 3.0 s against 0.45 s), and each thread's OpenBLAS buffer kept
pages in step with the labels and never gave them back: head refits every 3 labels
on one backbone grew a process 4.3 KB a label from 300 to 2,400 labels with two
threads, 2.3 KB with one. One thread gives the same head to the bit.

The limit is process-wide (``threadpoolctl``); it is set while at least one
scorer or trainer runs and the earlier limit is restored after the last one stops.
"""

import threading
from typing import Any

_lock = threading.Lock()
_users = 0
_limiter: Any = None


def acquire() -> None:
    """Limits BLAS to one thread until the matching :func:`release`."""
    global _users, _limiter
    with _lock:
        if _users == 0:
            from threadpoolctl import threadpool_limits

            _limiter = threadpool_limits(limits=1, user_api="blas")
        _users += 1


def release() -> None:
    """Ends one :func:`acquire`; the last one restores the limit found before."""
    global _users, _limiter
    with _lock:
        if _users == 0:
            return
        _users -= 1
        if _users == 0 and _limiter is not None:
            _limiter.restore_original_limits()
            _limiter = None
