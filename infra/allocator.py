"""glibc's allocator set so that what a long-running role frees goes back to the system.

With glibc's defaults a role's RSS climbs for hours without a leak: the mmap
threshold rises to the size of the largest array freed (up to 32 MB), so later
arrays of that size (drift calibration, decoded batches, a new model's session)
come from the heap, whose freed middle is never returned; and every thread that
allocates may get an arena of its own (8 per core). Measured with
``winnow bench soak --minutes 8 --rate 80`` on the 2-core machine: the scorer's
RSS stayed at 1.0 to 1.24 GB and rose, the trainer's rose 11.8 %; with a fixed
128 KiB mmap and trim threshold and two arenas the scorer's RSS followed its
live memory (0.14 to 0.45 GB, no upward trend) and the trainer's grew 0.3 %.

A role that trains (``winnow train``) pays for the small mmap threshold: torch's
activations and gradients of a few hundred KB each are then mapped and unmapped on
every step, page faults included (a scratch loop of the trainer's work at 16x16 took
1.6 times as long). ``tune_for_training`` raises its mmap threshold to 32 MiB (glibc's own ceiling),
and the trainer calls ``release_free_memory`` (``malloc_trim``) after each round and
head refit instead: RSS as low, at the faster speed.

Each setting is left alone where the environment sets it (``MALLOC_ARENA_MAX``,
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``:
the operator's word wins).
Other C libraries (musl, macOS) are left as they are.
"""

import ctypes
import functools
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

DEFAULTS: dict[str, tuple[int, int]] = {
    "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, 128 * 1024),
    "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, 128 * 1024),
    "MALLOC_ARENA_MAX": (M_ARENA_MAX, 2),
}
"""Environment variable -> (mallopt parameter, value) set when the variable is absent."""


TRAINING_MMAP_THRESHOLD = 32 * 1024 * 1024

ONEDNN_CACHE_CAPACITY = 256
"""Layer primitives oneDNN (torch's CPU kernels) keeps, instead of its 1,024. Each new
input shape of a layer (a round's last, shorter batch; an evaluation over a holdout of
another size) adds primitives, and a trainer meets new shapes as its labels grow: at
1,024 entries a small CNN's cache held 24 MB more than at 256 (600 shapes of two conv
layers). Measured cost where one shape's primitives no longer all fit, batches of 32
and 7 alternating at 96 px: ResNet-18 +7 % time, EfficientNet-Lite0 +2 % (64 entries:
+16 % and +21 %)."""
ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def tune_allocator() -> dict[str, int]:
    """Sets glibc's allocator for a long-running role; call it first, before threads start.

    Returns:
        The settings applied, by their environment variable name; empty where the C
        library is not glibc or the environment sets them all.
    """
    libc = _glibc()
    if libc is None:
        return {}
    applied = {}
    for variable, (parameter, value) in DEFAULTS.items():
        if _set(libc, variable, parameter, value):
            applied[variable] = value
    return applied


def tune_for_training() -> bool:
    """Raises the mmap threshold to 32 MiB for a role that trains (see the module's doc)
    and caps oneDNN's primitive cache (``ONEDNN_CACHE_CAPACITY``); call it before torch
    runs its first layer. Whether the threshold was set (not where the environment sets
    it, nor outside glibc)."""
    if not any(name in os.environ for name in ONEDNN_CACHE_VARIABLES):
        os.environ[ONEDNN_CACHE_VARIABLES[0]] = str(ONEDNN_CACHE_CAPACITY)
    libc = _glibc()
    return libc is not None and _set(
        libc, "MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, TRAINING_MMAP_THRESHOLD
    )


def release_free_memory() -> bool:
    """Gives the free pages of every heap back to the system (glibc's ``malloc_trim(0)``);
    whether any were. Milliseconds; a no-op outside glibc."""
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) == 1


def _set(libc: ctypes.CDLL, variable: str, parameter: int, value: int) -> bool:
    if variable in os.environ:
        return False
    if libc.mallopt(parameter, value) == 1:
        return True
    log.warning("glibc refused mallopt(%d, %d) for %s", parameter, value, variable)
    return False
