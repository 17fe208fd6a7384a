"""Readings of one role process: from ``/proc/<pid>`` and from its ``/metrics``."""

import os
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024 if hasattr(os, "sysconf") else 4


@dataclass(frozen=True)
class ProcessReading:
    """What the kernel says about a process: resident memory, open descriptors, threads."""

    rss_mb: float
    fds: int
    threads: int


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
    return ProcessReading(
        rss_mb=round(rss_kb / 1024, 2),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(fields["Threads"]),
    )


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
