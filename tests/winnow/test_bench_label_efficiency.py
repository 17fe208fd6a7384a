"""The label-efficiency benchmark runs end to end on a tiny configuration."""

import json
from pathlib import Path

import pytest

from winnow.bench.label_efficiency import STRATEGY_KEYS, main, summarize


@pytest.mark.slow
def test_tiny_bench_writes_every_key(tmp_path: Path) -> None:
    out, png = tmp_path / "le.json", tmp_path / "le.png"
    code = main(
        [
            "--seeds",
            "1",
            "--strategies",
            "margin,aift+filters,skal-split",
            "--max-labels",
            "20",
            "--round-labels",
            "10",
            "--min-steps",
            "5",
            "--workers",
            "1",
            "--full-steps",
            "20",
            "--json",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert {"full_accuracy", "target", "strategies"} <= set(result)
    assert set(result["strategies"]) == {"random", "margin", "aift+filters", "skal-split"}
    for entry in result["strategies"].values():
        assert set(STRATEGY_KEYS) <= set(entry)
        assert entry["labels"] == [10, 20]
        assert all(0.0 <= a <= 1.0 for a in entry["accuracy_mean"])
    assert png.stat().st_size > 0


def test_labels_to_target_and_savings() -> None:
    runs = {
        "random": [([10, 20, 30, 40], [0.5, 0.7, 0.8, 0.9])] * 2,
        "good": [
            ([10, 20, 30, 40], [0.6, 0.9, 0.9, 0.9]),
            ([10, 20, 30, 40], [0.6, 0.8, 0.9, 0.9]),
        ],
        "bad": [([10, 20, 30, 40], [0.1, 0.2, 0.3, 0.4])] * 2,
    }
    runs_named = {"random": runs["random"], "margin": runs["good"], "entropy": runs["bad"]}
    result = summarize(runs_named, full=0.9, target=0.85)
    assert result["random"]["labels_to_target"] == 40
    assert result["margin"]["labels_to_target"] == 20  # mean 0.85 at 20 labels
    assert result["margin"]["savings_vs_random"] == 2.0
    assert result["entropy"]["labels_to_target"] is None
    assert result["entropy"]["savings_vs_random"] is None
    assert result["margin"]["accuracy_std"][1] == pytest.approx(0.05)
