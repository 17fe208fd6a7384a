"""`winnow demo` end to end: the loop runs and the figures it reports add up."""

import json
from pathlib import Path

import pytest

from winnow.cli import main

pytestmark = pytest.mark.slow


def test_demo_learns_from_a_few_labels_and_writes_its_summary(tmp_path: Path) -> None:
    summary_path, plot_path = tmp_path / "summary.json", tmp_path / "plot.png"
    code = main(
        [
            "demo",
            "--max-frames",
            "500",
            "--rate",
            "0",
            "--budget",
            "0.2",
            "--http-port",
            "0",
            "--round-labels",
            "20",
            "--json",
            str(summary_path),
            "--plot",
            str(plot_path),
        ]
    )
    assert code == 0
    summary = json.loads(summary_path.read_text())
    for key in (
        "labels_used",
        "model_versions",
        "initial_accuracy",
        "final_accuracy",
        "full_accuracy",
    ):
        assert key in summary, key
    assert summary["frames"] == 500
    assert 0 < summary["labels_used"] <= 0.2 * 500
    assert summary["model_versions"] >= 2
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.3
    assert summary["full_accuracy"] > 0.9
    assert plot_path.stat().st_size > 10_000
