"""Readings of one role process: from ``/proc/<pid>`` and from its ``/metrics``."""

import os
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024 if hasattr(os, "sysconf") else 4


@dataclass(frozen=True)
class ProcessReading:
    """What the kernel says about a process: resident memory, open descriptors, threads.

    Attributes:
        rss_mb: the process's own resident memory.
        fds: its open descriptors.
        threads: its threads.
        children_rss_mb: the resident memory of its descendants (the trainer's round
            worker), summed; 0 without any.
        tree_pss_mb: the proportional set size of the process and its descendants
            together: what the role holds, each page it shares with them (or with other
            processes) counted once among them, so a child's imported libraries are not
            counted twice; None where ``/proc/<pid>/smaps_rollup`` cannot be read.
    """

    rss_mb: float
    fds: int
    threads: int
    children_rss_mb: float = 0.0
    tree_pss_mb: float | None = None


def read_process(pid: int) -> ProcessReading:
    """Reads ``/proc/<pid>/status`` and ``/proc/<pid>/fd`` (Linux only).

    Raises:
        ProcessLookupError: the process has exited (a zombie not yet reaped has no memory
            lines; the soak's 60-minute run crashed on one).
        OSError: the process is gone (or this is not Linux).
    """
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    if "VmRSS" not in fields:
        raise ProcessLookupError(f"process {pid} has exited (state {fields.get('State')})")
    rss_kb = int(fields["VmRSS"].split()[0])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    children_kb, pss_kb = 0, _pss_kb(pid)
    for child in descendants(pid):
        try:
            children_kb += _rss_kb(child)
            child_pss = _pss_kb(child)
        except OSError:  # exited meanwhile (the round worker is replaced now and then)
            continue
        pss_kb = None if pss_kb is None or child_pss is None else pss_kb + child_pss
    return ProcessReading(
        rss_mb=round(rss_kb / 1024, 2),
        fds=fds,
        threads=int(fields["Threads"]),
        children_rss_mb=round(children_kb / 1024, 2),
        tree_pss_mb=None if pss_kb is None else round(pss_kb / 1024, 2),
    )


def descendants(pid: int) -> list[int]:
    """The process ids of ``pid``'s children, their children, and so on (Linux)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as listed:
                    children = [int(c) for c in listed.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ProcessLookupError(f"process {pid} has exited")


def _pss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except PermissionError:
        return None
    except FileNotFoundError:
        if os.path.exists(f"/proc/{pid}"):
            return None  # a kernel without smaps_rollup (before 4.14)
        raise
    return None


def scrape(url: str, timeout: float = 10.0) -> dict[str, float]:
    """A role's ``/metrics`` as ``{sample name with labels: value}``, e.g.
    ``winnow_frames_total{outcome="selected"}``; label-less samples by bare name."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def total(metrics: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    found = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base == name and all(w in rest for w in wanted) and value == value:  # not NaN
            found += value
    return found
