"""``winnow bench drift``: the protocol runs and its figures mean what they say."""

import json
from pathlib import Path

import pytest

from winnow.bench.drift import format_table, run_drift_bench
from winnow.cli import build_parser

pytestmark = pytest.mark.slow


def test_bench_measures_run_length_and_delays_on_digits(tmp_path: Path) -> None:
    pytest.importorskip("river")
    result = run_drift_bench(dataset="digits", ert=300, runs=30, shifts=("brightness", "class_mix"))
    detectors = result["detectors"]
    assert set(detectors) == {"embedding", "prediction", "uncertainty", "adwin", "page_hinkley"}
    for name, r in detectors.items():
        assert r["ert"] == 300 and r["mean_run_length"] > 0, name
        assert set(r["shifts"]) == {"brightness", "class_mix"}
    # a strong brightness shift: the embedding detector finds it in far fewer frames than ERT
    assert detectors["embedding"]["shifts"]["brightness"]["detected_fraction"] >= 0.9
    assert detectors["embedding"]["shifts"]["brightness"]["mean_delay"] < 100
    assert detectors["prediction"]["shifts"]["class_mix"]["detected_fraction"] >= 0.9
    table = format_table(result)
    assert "embedding" in table and "class_mix" in table[:400]
    json.dumps(result)  # JSON-ready


def test_cli_has_the_bench_drift_command() -> None:
    args = build_parser().parse_args(["bench", "drift", "--dataset", "digits", "--json", "x.json"])
    assert args.ert == 1000 and args.runs == 100 and args.json == Path("x.json")
