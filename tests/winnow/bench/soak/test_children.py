"""A role's child processes count in the soak: their memory and processor time are read."""

import subprocess
import sys
import time

import pytest

from winnow.bench.soak.probe import cpu_seconds, descendants, read_process
from winnow.bench.soak.report import summarize

HOLDS_64_MB = "import time; kept = b'x' * (64 << 20); print('ready', flush=True); time.sleep(120)"
BURNS_THEN_SLEEPS = (
    "import time; end = time.process_time() + 0.6\n"
    "while time.process_time() < end: pass\n"
    "print('burnt', flush=True); time.sleep(120)"
)
REAPS = (
    "import subprocess, sys, time; "
    f"child = subprocess.Popen([sys.executable, '-c', {BURNS_THEN_SLEEPS!r}]); child.wait(); "
    "print('reaped', flush=True); time.sleep(120)"
)
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


def test_a_childs_processor_time_counts_with_its_role_alive_and_after_it_is_reaped() -> None:
    """Catches: a role's CPU read from its own process alone, so that the work it hands a
    child (the round worker) or a child it has replaced goes uncounted."""
    parent = subprocess.Popen([sys.executable, "-c", REAPS], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not descendants(parent.pid) or read_process(parent.pid).cpu_seconds < 0.5:
            assert time.monotonic() < deadline, "the child did not burn its processor time"
            time.sleep(0.1)
        assert cpu_seconds(parent.pid) < 0.5  # the parent itself only waits
        for pid in descendants(parent.pid):
            subprocess.run(["kill", "-9", str(pid)], check=False)
        assert parent.stdout is not None and parent.stdout.readline() == "reaped\n"
        assert not descendants(parent.pid)
        assert read_process(parent.pid).cpu_seconds >= 0.5  # counted as the parent's child
    finally:
        parent.kill()
        parent.wait(30)
        assert parent.stdout is not None
        parent.stdout.close()


def test_the_cores_a_role_keeps_busy_are_reported_after_warm_up_and_at_the_end() -> None:
    """Catches: a role whose processor use climbs over the run (head refits over every
    label, each more costly) reported by its average alone, or not at all."""
    cpu = [0.0]
    for i in range(1, 60):
        cpu.append(cpu[-1] + 10.0 * (0.5 if i < 50 else 1.0))  # half a core, a core at the end
    run = _run([1_000.0] * 60)
    for sample, seconds in zip(run["samples"], cpu, strict=True):
        sample["roles"]["trainer"]["cpu_seconds"] = seconds
    summary = summarize(run)["roles"]["trainer"]
    assert summary["cpu_cores_after_warmup"] == pytest.approx(0.5 + 0.5 * 10 / 53, abs=0.01)
    assert summary["cpu_cores_at_end"] == pytest.approx(1.0)
    assert summarize(_run([1_000.0] * 60))["roles"]["trainer"]["cpu_cores_after_warmup"] is None
