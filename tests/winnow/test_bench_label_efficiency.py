"""``winnow bench label-efficiency`` end to end on a tiny configuration, and its refusals."""

import json
from pathlib import Path

import numpy as np
import pytest

from winnow.bench.label_efficiency import STRATEGY_KEYS, main


@pytest.mark.slow
def test_tiny_bench_pairs_seeds_and_writes_every_key(tmp_path: Path) -> None:
    out, png = tmp_path / "le.json", tmp_path / "le.png"
    code = main(
        [
            "--seeds", "2",
            "--strategies", "margin,skal-split,mine",
            "--strategy-spec", "mine=variable:least_confidence::coreset",
            "--imbalance", "0.05", "--minority", "3",
            "--max-labels", "20",
            "--round-labels", "10",
            "--refit-labels", "5",
            "--min-steps", "5",
            "--workers", "1",
            "--full-steps", "20",
            "--full-seeds", "1",
            "--resamples", "100",
            "--json", str(out),
            "--plot", str(png),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["measure"] == "balanced_accuracy"  # class 3 at 5% of ten classes
    assert result["stream"]["class_shares"][3] <= 0.05
    assert set(result["targets"]) == {"0.9", "0.95", "0.98"}
    strategies = result["strategies"]
    assert list(strategies) == ["random", "margin", "skal-split", "mine"]
    assert result["config"]["strategies"]["mine"]["selector"] == "coreset"
    for entry in strategies.values():
        assert set(STRATEGY_KEYS) <= set(entry)
        assert entry["labels"][0] == 0 and entry["labels"][-1] == 20
        assert [s["seed"] for s in entry["seeds"]] == [0, 1]
        assert all(0.0 <= v <= 1.0 for v in entry["measure_mean"])
        assert len(entry["seeds"][0]["recall"][-1]) == 10
        for seed in entry["seeds"]:  # each point's labels, by true class
            assert [sum(c) for c in seed["label_counts"]] == seed["labels"]
            assert all(len(c) == 10 for c in seed["label_counts"])
        share = entry["at_labels"]["20"]["label_share"]
        assert len(share) == 10 and abs(sum(share) - 1) < 1e-3
    assert strategies["margin"]["vs_peers"]["skal-split"]["20"]["diff"] is not None
    assert "goals" in strategies["mine"] and "goals" not in strategies["skal-split"]
    # Pairing: per seed every strategy starts from the same weights, and those with a
    # random cold start sample the same frames until the first model change.
    refits = result["config"]["run"]["head_refits"]
    first = 2 if refits else 1  # points: 0 labels, then the first refit or round
    for seed in (0, 1):
        assert len({e["seeds"][seed]["measure"][0] for e in strategies.values()}) == 1
        heads = {
            name: tuple(strategies[name]["seeds"][seed]["measure"][:first])
            for name in ("random", "margin", "skal-split")
        }
        assert len(set(heads.values())) == 1, heads
    assert png.stat().st_size > 0


def test_unknown_strategy_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--strategies", "nope", "--json", str(tmp_path / "x.json")])
    assert code == 2
    assert "unknown strategies ['nope']" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_a_spec_the_policy_refuses_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--strategy-spec", "bad=variable:nonsense", "--json", str(tmp_path / "x.json")])
    assert code == 2
    assert "strategy bad" in capsys.readouterr().err


def test_missing_dataset_is_skipped(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--dataset", "/nonexistent/data.npz"]) == 0
    assert "not found; skipped" in capsys.readouterr().out


def test_pretrained_refuses_aift_before_extracting_features(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--pretrained", "--strategies", "aift", "--json", str(tmp_path / "x.json")])
    assert code == 2
    assert "AIFT needs views through the backbone" in capsys.readouterr().err


def _camera_npz(path: Path) -> None:
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 2
        images = rng.integers(0, 60, (n, 48, 64, 3)).astype(np.uint8)
        images[labels == 1, 12:36, 16:48] += 150  # a bright block marks class 1
        return images, labels.reshape(-1, 1)

    train, test = split(60), split(20)
    np.savez(path, train_images=train[0], train_labels=train[1], test_images=test[0],
             test_labels=test[1])  # fmt: skip


@pytest.mark.slow
def test_pretrained_runs_on_cached_features(tmp_path: Path) -> None:
    from trainer.architectures import ARCHITECTURES

    if "efficientnet_lite0" not in ARCHITECTURES:
        pytest.skip("the trainer has no efficientnet_lite0")
    data, out = tmp_path / "camera.npz", tmp_path / "le.json"
    _camera_npz(data)
    code = main(
        [
            "--dataset", str(data), "--pretrained", "--input-size", "64",
            "--seeds", "1", "--strategies", "margin", "--max-labels", "10",
            "--min-steps", "5", "--workers", "1", "--full-steps", "20", "--full-seeds", "1",
            "--resamples", "50", "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["stream"]["pretrained"] == "efficientnet_lite0"
    assert result["stream"]["feature_seconds"] >= 0
    # ImageNet features separate a bright block from noise: the full-data learner does
    assert result["full"]["mean"] >= 0.9


def test_an_unknown_peer_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps({"p": {"peer": "NoSuchStrategy"}}))
    code = main(["--strategy-specs", str(specs), "--json", str(tmp_path / "x.json")])
    assert code == 2
    assert "no 'NoSuchStrategy'" in capsys.readouterr().err


@pytest.mark.slow
def test_further_seeds_pool_with_an_earlier_run_into_the_run_over_all(tmp_path: Path) -> None:
    """``--first-seed`` keeps the full-data reference on seed 0, so two runs over seeds 0-1
    and 2 merge (``--merge``) into what one run over seeds 0-2 gives, but for wall times."""
    tiny = [
        "--strategies", "margin",
        "--max-labels", "12",
        "--round-labels", "6",
        "--refit-labels", "3",
        "--min-steps", "3",
        "--workers", "1",
        "--full-steps", "10",
        "--full-seeds", "1",
        "--resamples", "50",
    ]  # fmt: skip
    paths = {name: tmp_path / f"{name}.json" for name in ("whole", "first", "more", "merged")}
    assert main([*tiny, "--seeds", "3", "--json", str(paths["whole"])]) == 0
    assert main([*tiny, "--seeds", "2", "--json", str(paths["first"])]) == 0
    more = [*tiny, "--seeds", "1", "--first-seed", "2", "--json", str(paths["more"])]
    assert main(more) == 0
    merge = ["--merge", str(paths["first"]), str(paths["more"]), "--json", str(paths["merged"])]
    assert main(merge) == 0
    whole, more_result, merged = (
        json.loads(paths[n].read_text()) for n in ("whole", "more", "merged")
    )
    assert more_result["config"]["seeds"] == [2]
    assert more_result["full"] == whole["full"]  # the reference stayed on seed 0
    assert merged["config"]["seeds"] == [0, 1, 2]

    def timeless(value: object) -> object:
        if isinstance(value, dict):
            return {k: timeless(v) for k, v in value.items() if k != "seconds"}
        if isinstance(value, list):
            return [timeless(v) for v in value]
        return value

    assert timeless(merged["strategies"]) == timeless(whole["strategies"])
    # a run over the same seed again is refused, with the files named
    again = ["--merge", str(paths["first"]), str(paths["whole"]), "--json", str(paths["merged"])]
    assert main(again) == 2


def test_no_seed_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seeds", "0"]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
    assert main(["--first-seed", "-1"]) == 2


def test_merge_names_what_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other, missing = tmp_path / "other.json", tmp_path / "missing.json"
    other.write_text(json.dumps({"dataset": "digits"}))
    assert main(["--merge", str(other), str(other), "--json", str(tmp_path / "m.json")]) == 2
    assert "not a label-efficiency result" in capsys.readouterr().err
    assert main(["--merge", str(other), str(missing), "--json", str(tmp_path / "m.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()
