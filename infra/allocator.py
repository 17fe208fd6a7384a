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

Each setting is left alone where the environment sets it (``MALLOC_ARENA_MAX``,
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``: the operator's word wins).
Other C libraries (musl, macOS) are left as they are.
"""

import ctypes
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


def tune_allocator() -> dict[str, int]:
    """Sets glibc's allocator for a long-running role; call it first, before threads start.

    Returns:
        The settings applied, by their environment variable name; empty where the C
        library is not glibc or the environment sets them all.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return {}
    if not hasattr(libc, "gnu_get_libc_version"):
        return {}
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = {}
    for variable, (parameter, value) in DEFAULTS.items():
        if variable in os.environ:
            continue
        if mallopt(parameter, value) == 1:
            applied[variable] = value
        else:
            log.warning("glibc refused mallopt(%d, %d) for %s", parameter, value, variable)
    return applied
