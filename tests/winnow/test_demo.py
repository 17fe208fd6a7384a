"""`winnow demo` end to end: the loop runs and the figures it reports add up."""

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import SecretStr

from infra.kafka.settings import KafkaSettings
from winnow.cli import main
from winnow.demo.runner import _Broker, _scorer_settings, _trainer_settings

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


def test_scorer_trainer_and_labelers_share_one_kafka_settings(tmp_path: Path) -> None:
    kafka = KafkaSettings(
        bootstrap="kafka.example:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="winnow",
        sasl_password=SecretStr("secret"),
        ssl_cafile=tmp_path / "ca.pem",
        topic_prefix="demo.",
    )
    args = argparse.Namespace(
        policy="variable", budget=0.2, input_size=None, round_labels=20, round_seconds=60
    )
    data = SimpleNamespace(name="digits", classes=["0", "1"], channels=1)
    with _Broker(kafka) as connected:  # a bootstrap address: no embedded broker
        scorer = _scorer_settings(connected, args)
        trainer = _trainer_settings(connected, data, args, tmp_path)  # type: ignore[arg-type]
    assert connected is kafka and scorer.kafka is kafka
    assert scorer.scorer.max_wait_ms == 10 and not scorer.drift.enabled
    assert trainer.kafka.model_dump(exclude={"client_id"}) == kafka.model_dump(
        exclude={"client_id"}
    ), "SASL and TLS reach the trainer"
    assert trainer.kafka.client_id == "winnow-trainer"


def test_the_demo_runs_the_scorers_own_policy_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails if the demo pins a policy of its own: it stood at ``variable`` while the scorer
    shipped ``quantile``, so the demo showed a policy no deployment ran."""
    from service.config import PolicySettings
    from winnow.cli import build_parser

    monkeypatch.delenv("WINNOW_POLICY_NAME", raising=False)
    kafka = KafkaSettings(bootstrap="kafka.example:9093")
    args = build_parser().parse_args(["demo", "--budget", "0.2"])
    with _Broker(kafka) as connected:
        assert _scorer_settings(connected, args).policy.name == PolicySettings().name
        monkeypatch.setenv("WINNOW_POLICY_NAME", "split")  # a deployment's choice
        assert _scorer_settings(connected, args).policy.name == "split"
        args = build_parser().parse_args(["demo", "--policy", "fixed"])
        assert _scorer_settings(connected, args).policy.name == "fixed"
