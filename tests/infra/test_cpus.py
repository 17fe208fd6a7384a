"""The CPUs a process may use: affinity mask and cgroup CPU quota (v2 and v1 layouts)."""

import os
from pathlib import Path

import pytest

from infra.cpus import (
    available_cpus,
    cgroup_cpu_quota,
    cpu_limit,
    parse_cpu_max,
    share_of_cpus,
)

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("200000 100000", 2.0),
        ("150000 100000", 1.5),
        ("50000 100000", 0.5),
        ("max 100000", None),
        ("", None),
        ("garbage", None),
        ("0 100000", None),
    ],
)
def test_cpu_max_is_read_as_cpus(text: str, cpus: float | None) -> None:
    assert parse_cpu_max(text) == cpus


def _v2(root: Path, text: str) -> Path:
    (root / "cpu.max").write_text(text + "\n")
    return root


def test_a_pod_limited_to_one_cpu_gets_one_thread_whatever_the_machine(tmp_path: Path) -> None:
    """A Kubernetes CPU limit of 1 on a many-core node: one CPU, not the node's count."""
    root = _v2(tmp_path, "100000 100000")
    assert available_cpus(root) == 1
    assert cpu_limit(root) == (1 if (os.cpu_count() or 1) > 1 else None)


def test_a_fractional_quota_rounds_up(tmp_path: Path) -> None:
    assert available_cpus(_v2(tmp_path, "50000 100000")) == 1
    if AFFINITY >= 2:
        assert available_cpus(_v2(tmp_path, "150000 100000")) == 2


def test_no_quota_leaves_the_affinity_mask_and_no_limit(tmp_path: Path) -> None:
    root = _v2(tmp_path, "max 100000")
    assert available_cpus(root) == AFFINITY
    assert cgroup_cpu_quota(root) is None
    if AFFINITY == os.cpu_count():
        assert cpu_limit(root) is None  # ONNX Runtime keeps its own default


def test_cgroup_v1_quota_and_its_absence(tmp_path: Path) -> None:
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path) is None
    (cpu / "cpu.cfs_quota_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.0
    assert available_cpus(tmp_path) == 1


def test_no_cgroup_files_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path) is None
    assert available_cpus(tmp_path) == AFFINITY


def test_processes_share_the_cpus_and_each_gets_at_least_one(tmp_path: Path) -> None:
    root = _v2(tmp_path, "400000 100000")
    cpus = min(AFFINITY, 4)
    assert share_of_cpus(1, root) == cpus
    assert share_of_cpus(2, root) == max(1, cpus // 2)
    assert share_of_cpus(64, root) == 1
