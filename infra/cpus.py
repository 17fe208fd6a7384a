"""How many CPUs this process may use: its affinity mask and its cgroup's CPU quota.

``os.cpu_count()`` counts the machine's cores. In a Kubernetes pod with a CPU limit of 2
on a 64-core node it says 64, and a library that sizes its thread pool from it (ONNX
Runtime counts the physical cores) runs 64 threads on 2 CPUs' worth of time: they
preempt each other, and the kernel throttles the whole container once its quota for the
period is spent. The quota is in ``cpu.max`` (cgroup v2: ``"<quota> <period>"`` or
``"max <period>"``) or ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (cgroup v1, -1
for none).
"""

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may use: the affinity mask, capped by a cgroup CPU quota.

    A fractional quota is rounded up (1.5 CPUs: two threads, each busy part of the time).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def cpu_limit(cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """``available_cpus()`` where it is below the machine's count, else None (no limit).

    None leaves a library's own default in place (ONNX Runtime: one thread per physical
    core, which on a machine with hyperthreads is fewer than the CPUs).
    """
    cpus = available_cpus(cgroup_root)
    return cpus if cpus < (os.cpu_count() or cpus) else None


def share_of_cpus(processes: int, cgroup_root: Path = CGROUP_ROOT) -> int:
    """Each of ``processes`` processes' whole share of the available CPUs, at least 1."""
    return max(1, available_cpus(cgroup_root) // max(1, processes))


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The cgroup's CPU quota in CPUs (quota over period), or None where there is none."""
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        return parse_cpu_max(v2)
    quota = _read(root / "cpu" / "cpu.cfs_quota_us") or _read(root / "cpu.cfs_quota_us")
    period = _read(root / "cpu" / "cpu.cfs_period_us") or _read(root / "cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    return _ratio(quota, period)


def parse_cpu_max(text: str) -> float | None:
    """``cpu.max``'s ``"<quota> <period>"`` in CPUs; None for ``"max ..."`` or anything else."""
    parts = text.split()
    if len(parts) != 2:
        return None
    return _ratio(parts[0], parts[1])


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    return q / p if q > 0 and p > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
