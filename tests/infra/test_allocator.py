"""glibc's allocator in a fresh process: the settings are applied unless the environment
sets them, and memory freed by a worker thread goes back to the system."""

import json
import os
import subprocess
import sys

import pytest

from infra.allocator import DEFAULTS

PROBE = """
import json, threading, numpy as np
from infra.allocator import tune_allocator
applied = tune_allocator()
def rss():
    status = open('/proc/self/status').read().split('VmRSS:')[1]
    return int(status.split()[0]) / 1024
def churn():  # arrays of a few MB made and freed by a thread, as drift calibration does
    keep = []
    for size in range(2, 40):
        big = np.ones(size * 131072)  # 2 to 39 MB
        keep.append(np.ones(20000))  # small survivors between the big ones
        del big
before = rss()
threads = [threading.Thread(target=churn) for _ in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
print(json.dumps({"applied": applied, "grown_mb": rss() - before}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env, "OPENBLAS_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        check=True,
        cwd=os.getcwd(),
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_every_setting_applies_unless_the_environment_sets_it() -> None:
    """The failure it catches: the tuning silently not applied (mallopt refused, wrong
    parameter numbers), or overriding what an operator set in the environment."""
    assert _probe()["applied"] == {k: v for k, (_, v) in DEFAULTS.items()}
    applied = _probe(MALLOC_ARENA_MAX="4")["applied"]
    assert "MALLOC_ARENA_MAX" not in applied and "MALLOC_MMAP_THRESHOLD_" in applied


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_arrays_freed_by_threads_go_back_to_the_system() -> None:
    """The failure it catches: the soak's RSS growth without a leak. Under glibc's dynamic
    mmap threshold the freed arrays stay in the threads' heaps (RSS grows by tens of MB);
    tuned, they are unmapped when freed."""
    tuned = _probe()["grown_mb"]
    assert tuned < 20, tuned


def test_every_winnow_command_tunes_the_allocator_first(monkeypatch) -> None:
    """The failure it catches: the call dropped from the command line's entry point, so the
    roles run with glibc's defaults again (the soak's RSS then grows)."""
    import winnow.cli

    calls: list[str] = []
    monkeypatch.setattr(winnow.cli, "tune_allocator", lambda: calls.append("tuned") or {})
    with pytest.raises(SystemExit):
        winnow.cli.main(["--help"])
    assert calls == ["tuned"]
