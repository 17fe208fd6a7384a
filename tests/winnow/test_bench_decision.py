"""``winnow bench decision``: it times the scorer's decision, phase by phase, and says so."""

import itertools
import json
from pathlib import Path

import pytest

from winnow.bench.decision import PHASES, DecisionConfig, SyntheticStream, time_strategy
from winnow.bench.efficiency.errors import BenchConfigError
from winnow.bench.efficiency.specs import STRATEGIES, StrategySpec
from winnow.cli import build_parser


def _run(*argv: str) -> int:
    args = build_parser().parse_args(["bench", "decision", *argv])
    return int(args.func(args))


def test_command_times_each_strategy_in_each_phase(tmp_path: Path) -> None:
    out = tmp_path / "decision.json"
    code = _run(
        "--strategies",
        "default,variable",
        "--strategy-spec",
        "bare=quantile::audit",
        "--batches",
        "20",
        "--repeats",
        "2",
        "--warmup",
        "5",
        "--json",
        str(out),
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["bench"] == "decision" and report["machine"]["cpu_count"] >= 1
    assert list(report["strategies"]) == ["default", "variable"]  # bare was not named
    default = report["strategies"]["default"]["phases"]
    assert [default[p]["leading"] for p in PHASES] == ["cold start", "cold start", "strategy"]
    for name, result in report["strategies"].items():
        for phase in PHASES:
            figures = result["phases"][phase]
            assert figures["cpu_us_per_frame"] > 0, (name, phase)
            assert figures["cpu_us_per_frame"] <= figures["cpu_us_per_frame_median"]
            # the policy decided and spent its budget (5 % of the frames), not more
            assert 0.02 < figures["selected_fraction"] <= 0.06, (name, phase)


def test_cost_is_the_best_pass_over_its_frames() -> None:
    ticks = itertools.count(step=0.5)  # each pass lasts one tick
    config = DecisionConfig(batch=8, dim=4, classes=3, batches=4, repeats=3, warmup=0)
    phases = time_strategy(STRATEGIES["default"], config, clock=lambda: next(ticks))
    for figures in phases.values():
        assert figures["cpu_us_per_frame"] == pytest.approx(0.5 / 32 * 1e6)


def test_strategy_without_cold_start_leads_from_the_first_frame() -> None:
    spec = StrategySpec(settings={"name": "variable", "cold_start": "none"})
    config = DecisionConfig(batch=8, dim=4, classes=3, batches=3, repeats=1, warmup=0)
    phases = time_strategy(spec, config)
    assert [phases[p]["leading"] for p in PHASES] == ["strategy"] * 3


def test_stream_probabilities_mostly_name_the_cluster() -> None:
    stream = SyntheticStream(DecisionConfig(batch=500, dim=32, classes=5))
    embeddings, probabilities, labels = stream.batch()
    assert embeddings.shape == (500, 32) and probabilities.shape == (500, 5)
    assert probabilities.sum(1) == pytest.approx(1.0, abs=1e-5)
    agree = (probabilities.argmax(1) == labels).mean()
    assert 0.6 < agree < 1.0  # informative, not certain: the margins vary


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategies", "skal-pal"], "peer"),
        (["--strategies", "nonesuch"], "unknown strategy 'nonesuch'"),
        (["--budget", "0"], "budget"),
        (["--classes", "1"], "2 classes"),
    ],
)
def test_bad_input_is_refused_clearly(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "decision.json"
    assert _run(*argv, "--batches", "2", "--repeats", "1", "--json", str(out)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_config_refuses_empty_passes() -> None:
    with pytest.raises(BenchConfigError):
        DecisionConfig(batches=0)
