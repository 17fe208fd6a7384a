"""Readings of one role process: from ``/proc/<pid>`` and from its ``/metrics``."""

import os
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024 if hasattr(os, "sysconf") else 4
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcessReading:
    """What the kernel says about a process: resident memory, open descriptors, threads.

    Attributes:
        rss_mb: the process's own resident memory.
        fds: its open descriptors.
        threads: its threads.
        children_rss_mb: the resident memory of its descendants (the trainer's round
            worker), summed; 0 without any.
        tree_anon_mb: the anonymous resident memory (``RssAnon``: heaps, arenas, tensors;
            not the pages of libraries and files) of the process and its descendants,
            summed. What a leak grows, wherever in the role it is; no page is counted
            twice (children are started with exec, so they share no anonymous pages), and
            unlike a proportional set size it does not move when another process maps
            the same libraries. None where the kernel has no ``RssAnon`` (before 4.5).
        cpu_seconds: the processor time (user and system) the process and its
            descendants have used so far, those it has reaped included (round workers
            replaced); its rise between two readings over their interval is the cores the
            role kept busy.
    """

    rss_mb: float
    fds: int
    threads: int
    children_rss_mb: float = 0.0
    tree_anon_mb: float | None = None
    cpu_seconds: float = 0.0


def read_process(pid: int) -> ProcessReading:
    """Reads ``/proc/<pid>/status`` and ``/proc/<pid>/fd`` (Linux only).

    Raises:
        ProcessLookupError: the process has exited (a zombie not yet reaped has no memory
            lines; the soak's 60-minute run crashed on one).
        OSError: the process is gone (or this is not Linux).
    """
    fields = _status(pid)
    if "VmRSS" not in fields:
        raise ProcessLookupError(f"process {pid} has exited (state {fields.get('State')})")
    rss_kb = int(fields["VmRSS"].split()[0])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    anon_kb = _kb(fields.get("RssAnon"))
    cpu = cpu_seconds(pid)
    children_kb = 0
    for child in descendants(pid):
        try:
            child_fields = _status(child)
            child_cpu = cpu_seconds(child)
        except OSError:  # exited meanwhile (the round worker is replaced now and then)
            continue
        if "VmRSS" not in child_fields:  # exited, not reaped yet: it holds no memory
            continue
        cpu += child_cpu
        children_kb += _kb(child_fields.get("VmRSS")) or 0
        child_anon = _kb(child_fields.get("RssAnon"))
        anon_kb = None if anon_kb is None or child_anon is None else anon_kb + child_anon
    return ProcessReading(
        rss_mb=round(rss_kb / 1024, 2),
        fds=fds,
        threads=int(fields["Threads"]),
        children_rss_mb=round(children_kb / 1024, 2),
        tree_anon_mb=None if anon_kb is None else round(anon_kb / 1024, 2),
        cpu_seconds=round(cpu, 2),
    )


def cpu_seconds(pid: int) -> float:
    """User and system time of ``pid`` and of the children it has reaped (``/proc/<pid>/stat``
    fields 14 to 17), in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        # the command name is in parentheses and may hold spaces: split after its end
        fields = stat.read().rpartition(")")[2].split()
    return sum(int(v) for v in fields[11:15]) / _TICKS


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


def _status(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def _kb(value: str | None) -> int | None:
    """``"1234 kB"`` -> 1234; None for a field the kernel does not have (or a zombie)."""
    return None if value is None else int(value.split()[0])


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
