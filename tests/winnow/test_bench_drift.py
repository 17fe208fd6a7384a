"""``winnow bench drift``: the protocol runs and its figures mean what they say."""

import json
from pathlib import Path

import pytest

from winnow.bench.drift import format_table, run_drift_bench
from winnow.cli import build_parser

pytestmark = pytest.mark.slow


def test_bench_measures_run_length_and_delays_on_digits(tmp_path: Path) -> None:
    pytest.importorskip("river")
    result = run_drift_bench(
        dataset="digits", ert=300, runs=30, references=6, shifts=("brightness", "class_mix")
    )
    detectors = result["detectors"]
    assert set(detectors) == {
        "embedding",
        "prediction",
        "uncertainty",
        "combined",
        "adwin",
        "page_hinkley",
    }
    assert result["runs"] == 30 and result["references"] == 6
    # the held-out frames are split between the reference and the stream pool
    assert result["reference_frames"] + result["stream_pool_frames"] > 800
    for name, r in detectors.items():
        assert r["ert"] == 300 and r["mean_run_length"] > 0, name
        spread = r["run_length_by_reference"]
        assert spread["p10"] <= spread["median"] <= spread["p90"], name
        assert set(r["shifts"]) == {"brightness", "class_mix"}
    # together the detectors alarm on brightness at least as fast as the fastest alone
    fastest = min(
        detectors[d]["shifts"]["brightness"]["mean_delay"] for d in ("embedding", "uncertainty")
    )
    assert detectors["combined"]["shifts"]["brightness"]["mean_delay"] <= 2 * fastest
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
    assert args.references == 20 and args.reference_frames == 1000
