"""A role's child processes count in the soak: their memory is read and judged."""

import subprocess
import sys
import time

import pytest

from winnow.bench.soak.probe import descendants, read_process
from winnow.bench.soak.report import summarize

HOLDS_64_MB = "import time; kept = b'x' * (64 << 20); print('ready', flush=True); time.sleep(120)"
PARENT = (
    "import subprocess, sys; "
    f"child = subprocess.Popen([sys.executable, '-c', {HOLDS_64_MB!r}]); child.wait()"
)


def test_a_grandchilds_memory_is_read_with_its_role() -> None:
    """Catches: a role (the trainer) that moved its memory into a child process reported
    with its own process alone."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT])
    try:
        deadline = time.monotonic() + 30
        while (
            not (found := descendants(parent.pid)) or read_process(parent.pid).children_rss_mb < 64
        ):
            assert time.monotonic() < deadline, "the child did not fill its memory"
            time.sleep(0.1)
        reading = read_process(parent.pid)
        assert len(found) == 1 and reading.children_rss_mb >= 64 > reading.rss_mb
        assert reading.tree_anon_mb is not None and reading.tree_anon_mb >= 64
    finally:
        for pid in descendants(parent.pid):
            subprocess.run(["kill", str(pid)], check=False)
        parent.wait(30)


def _run(trainer_anon: list[float]) -> dict:
    samples = [
        {
            "t": 10.0 * i,
            "lag": 0,
            "roles": {
                "scorer": {"rss_mb": 100.0, "tree_anon_mb": 90.0},
                "trainer": {"rss_mb": 800.0, "tree_anon_mb": anon},
                "label-app": {"rss_mb": 70.0, "tree_anon_mb": 60.0},
            },
        }
        for i, anon in enumerate(trainer_anon)
    ]
    run = {
        "samples": samples,
        "config": {"warmup_s": 60.0, "duration_s": 10.0 * len(samples)},
        "frames": {"lost": 0},
    }
    return summarize(run)


def test_memory_grown_in_a_child_fails_the_verdict_though_the_role_itself_holds() -> None:
    """Catches: a pass for a trainer whose own RSS is flat while the process tree grew."""
    flat = _run([1_000.0] * 60)
    assert flat["verdict"]["result"] == "pass", flat["verdict"]
    grown = _run([1_000.0 + 2.0 * i for i in range(60)])  # +10 % over the run
    assert grown["roles"]["trainer"]["rss_growth_after_warmup"] == 0
    assert grown["roles"]["trainer"]["tree_anon_growth_after_warmup"] == pytest.approx(
        0.09, abs=0.02
    )
    assert grown["verdict"]["result"] == "fail"
    assert any("trainer" in p for p in grown["verdict"]["problems"])
