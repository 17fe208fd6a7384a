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


TRAINING_PROBE = """
import json, numpy as np
from infra.allocator import release_free_memory, tune_allocator, tune_for_training
tune_allocator()
raised = tune_for_training()
def rss():
    status = open('/proc/self/status').read().split('VmRSS:')[1]
    return int(status.split()[0]) / 1024
before = rss()
bigs, keep = [], []
for size in range(2, 20):  # arrays of 2 to 19 MB, each with a small survivor after it
    bigs.append(np.ones(size * 131072))
    keep.append(np.ones(20000))
del bigs  # free, but held between the survivors
held = rss() - before
trimmed = release_free_memory()
after = rss() - before
print(json.dumps({"raised": raised, "held_mb": held, "trimmed": trimmed, "after_mb": after}))
"""


def _probe(probe: str = PROBE, **env: str) -> dict:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "ONEDNN_", "DNNL_"))
    }
    out = subprocess.run(
        [sys.executable, "-c", probe],
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_training_role_takes_arrays_from_the_heap_and_trimming_returns_them() -> None:
    """The failures it catches: ``tune_for_training`` not raising the mmap threshold (the
    arrays would be unmapped when freed, nothing held: the trainer's steps then pay page
    faults), and ``release_free_memory`` not giving the held pages back (the trainer's RSS
    then keeps what its largest round freed)."""
    result = _probe(TRAINING_PROBE)
    assert result["raised"] is True
    assert result["held_mb"] > 100, result  # 189 MB of arrays freed between survivors
    assert result["trimmed"] is True
    assert result["after_mb"] < 10, result
    # where the operator set the threshold, it stays: the arrays are unmapped when freed
    kept = _probe(TRAINING_PROBE, MALLOC_MMAP_THRESHOLD_="131072")
    assert kept["raised"] is False and kept["held_mb"] < 10, kept


ONEDNN_PROBE = """
import json
from infra.allocator import release_free_memory, tune_allocator, tune_for_training
tune_allocator()
tune_for_training()
import torch
torch.set_num_threads(1)
def rss():
    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) / 1024
net = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3))
with torch.no_grad():
    net(torch.zeros(2, 1, 8, 8))
    release_free_memory()
    before = rss()
    for width in range(8, 608):  # 600 input shapes: 1,200 primitives
        net(torch.zeros(2, 1, 8, width))
release_free_memory()
print(json.dumps({"grown_mb": rss() - before, "enabled": torch.backends.mkldnn.is_available()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS from /proc")
def test_a_training_role_caps_the_layer_primitives_it_keeps() -> None:
    """The failure it catches: ``tune_for_training`` not capping oneDNN's primitive cache,
    so a trainer's RSS grows with each new layer shape its rounds meet, up to 1,024
    entries (measured 55 MB here against 37 MB at the cap)."""
    capped = _probe(ONEDNN_PROBE)
    if not capped["enabled"]:
        pytest.skip("torch without oneDNN")
    # the operator's word wins: oneDNN's own capacity where the environment sets it
    full = _probe(ONEDNN_PROBE, ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024")
    assert capped["grown_mb"] < full["grown_mb"] - 10, (capped, full)


def test_every_winnow_command_tunes_the_allocator_first(monkeypatch) -> None:
    """The failure it catches: the call dropped from the command line's entry point, so the
    roles run with glibc's defaults again (the soak's RSS then grows)."""
    import winnow.cli

    calls: list[str] = []
    monkeypatch.setattr(winnow.cli, "tune_allocator", lambda: calls.append("tuned") or {})
    with pytest.raises(SystemExit):
        winnow.cli.main(["--help"])
    assert calls == ["tuned"]


def test_the_train_command_tunes_for_training(monkeypatch) -> None:
    """The failure it catches: the trainer run with the scorer's small mmap threshold, its
    steps slower by page faults."""
    import trainer.main
    import winnow.cli

    calls: list[str] = []
    monkeypatch.setattr(winnow.cli, "tune_for_training", lambda: calls.append("training"))
    monkeypatch.setattr(trainer.main, "run_trainer", lambda settings: calls.append("run") or 0)
    assert winnow.cli.main(["train", "--classes", "a,b"]) == 0
    assert calls == ["training", "run"]
