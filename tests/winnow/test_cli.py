"""The ``winnow`` command: help for every subcommand, settings from options, missing extras."""

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from winnow import cli


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple]:
    """Every runnable command path, e.g. ("model", "init")."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [prefix]
    return [
        path for name, sub in subs[0].choices.items() for path in _commands(sub, (*prefix, name))
    ]


COMMANDS = _commands(cli.build_parser())


def test_the_command_list_covers_every_role() -> None:
    assert {" ".join(c) for c in COMMANDS} >= {
        "broker",
        "serve",
        "label-app",
        "label-studio-bridge",
        "model init",
        "train",
        "demo",
        "produce",
        "bench throughput",
        "bench drift",
        "bench label-efficiency",
    }


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_subcommand_has_help(command: tuple[str, ...], capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: winnow {' '.join(command)}")


def test_the_installed_script_prints_help() -> None:
    script = Path(sys.executable).with_name("winnow")
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for command in ("serve", "label-app", "train", "produce", "bench"):
        assert command in out.stdout


@pytest.fixture
def frozen_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings refuse assignment, as frozen settings do: the CLI must build them by copy."""
    from infra.kafka.settings import KafkaSettings
    from service.config import HttpSettings, LabelAppSettings, ScorerSettings, Settings
    from service.labeling.label_studio import LabelStudioSettings
    from trainer.config import TrainerSettings

    def refuse(self: object, name: str, value: object) -> None:
        raise AssertionError(f"{type(self).__name__}.{name} assigned after construction")

    for cls in (
        Settings,
        ScorerSettings,
        HttpSettings,
        KafkaSettings,
        LabelAppSettings,
        LabelStudioSettings,
        TrainerSettings,
    ):
        monkeypatch.setattr(cls, "__setattr__", refuse)


def _capture(monkeypatch: pytest.MonkeyPatch, target: str) -> list[Any]:
    calls: list[Any] = []
    monkeypatch.setattr(target, lambda *args: calls.append(args) or 0)
    return calls


@pytest.mark.usefixtures("frozen_settings")
def test_serve_options_override_settings_and_keep_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WINNOW_SCORER_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("WINNOW_HTTP_HOST", "10.0.0.1")
    calls = _capture(monkeypatch, "service.http.serve.serve")
    model = tmp_path / "m.onnx"
    assert cli.main(["serve", "--model", str(model), "--device", "cpu", "--port", "0"]) == 0
    ((settings,),) = calls
    assert settings.scorer.model_path == model
    assert settings.scorer.max_batch_size == 7
    assert settings.device == "cpu"
    assert (settings.http.host, settings.http.port) == ("10.0.0.1", 0)


def test_serve_without_a_model_or_releases_says_how_to_get_one(monkeypatch, capsys) -> None:
    calls = _capture(monkeypatch, "service.http.serve.serve")
    monkeypatch.delenv("WINNOW_SCORER_MODEL_PATH", raising=False)
    monkeypatch.setenv("WINNOW_SCORER_FOLLOW_RELEASES", "false")
    assert cli.main(["serve"]) == 2
    assert calls == []
    assert "winnow model init" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "named"),
    [(["--policy", "bogus"], "WINNOW_POLICY_NAME"), (["--budget", "2"], "WINNOW_POLICY_BUDGET")],
)
def test_the_demo_refuses_a_bad_policy_before_it_starts(
    monkeypatch: pytest.MonkeyPatch, capsys, argv: list[str], named: str
) -> None:
    """Fails if a bad policy reaches the running demo (a pydantic traceback after the
    broker started) instead of one line and exit 2."""
    import winnow.demo

    def started(args: argparse.Namespace) -> int:
        raise AssertionError("the demo started")

    monkeypatch.setattr(winnow.demo, "run_demo", started)
    assert cli.main(["demo", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("winnow demo: invalid settings: ") and named in err


@pytest.mark.usefixtures("frozen_settings")
def test_serve_refuses_a_dali_decoder_without_dali(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """DALI's decoder where it would run and is not installed: one line naming the extra, not
    a traceback from the scorer's first batch; ``dali`` on a CPU node falls back instead."""
    from service.pipeline import dali_decode

    calls = _capture(monkeypatch, "service.http.serve.serve")
    monkeypatch.setattr(dali_decode, "dali_available", lambda: (False, "pip install it[dali]"))
    model = str(tmp_path / "m.onnx")
    monkeypatch.setenv("WINNOW_SCORER_DECODER", "dali-cpu")
    assert cli.main(["serve", "--model", model, "--device", "cpu"]) == 2
    assert "WINNOW_SCORER_DECODER=dali-cpu: pip install it[dali]" in capsys.readouterr().err
    monkeypatch.setenv("WINNOW_SCORER_DECODER", "dali")
    assert cli.main(["serve", "--model", model, "--device", "cpu"]) == 0
    assert len(calls) == 1


@pytest.mark.usefixtures("frozen_settings")
def test_train_options_override_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WINNOW_TRAINER_ROUND_MIN_LABELS", "5")
    calls = _capture(monkeypatch, "trainer.main.run_trainer")
    argv = ["train", "--classes", "cat, dog", "--input-size", "28", "--channels", "1"]
    assert cli.main([*argv, "--data-dir", str(tmp_path), "--device", "cpu"]) == 0
    ((settings,),) = calls
    assert settings.classes == ["cat", "dog"]
    assert (settings.input_size, settings.channels, settings.device) == (28, 1, "cpu")
    assert settings.data_dir == tmp_path
    assert settings.round_min_labels == 5


@pytest.mark.usefixtures("frozen_settings")
def test_label_app_options_override_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WINNOW_LABEL_APP_TEAM_TOKEN", "t" * 32)
    calls = _capture(monkeypatch, "service.labeling.serve.serve_app")
    assert cli.main(["label-app", "--host", "0.0.0.0", "--port", "8101"]) == 0
    ((_kafka, _factory, host, port),) = calls
    assert (host, port) == ("0.0.0.0", 8101)


@pytest.mark.usefixtures("frozen_settings")
def test_label_studio_bridge_options_override_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WINNOW_LABEL_STUDIO_WEBHOOK_TOKEN", "w" * 32)
    monkeypatch.setenv("WINNOW_LABEL_STUDIO_API_KEY", "k" * 32)
    built: list[Any] = []
    monkeypatch.setattr(
        "service.labeling.label_studio.create_bridge_app", lambda k, s: built.append(s)
    )
    calls = _capture(monkeypatch, "service.labeling.serve.serve_app")
    argv = ["label-studio-bridge", "--url", "http://ls:8080", "--project-id", "4", "--port", "0"]
    assert cli.main(argv) == 0
    settings = built[0]
    assert (settings.url, settings.project_id, settings.port) == ("http://ls:8080", 4, 0)
    assert calls[0][2:] == ("127.0.0.1", 0)


def test_a_command_without_its_extra_names_the_extra(monkeypatch, capsys) -> None:
    real = cli.find_spec
    monkeypatch.setattr(cli, "find_spec", lambda name: None if name == "torch" else real(name))
    calls = _capture(monkeypatch, "trainer.main.run_trainer")
    assert cli.main(["train", "--classes", "a,b"]) == 2
    assert calls == []
    err = capsys.readouterr().err
    assert "winnow train needs the trainer extra: pip install 'winnow-stream[trainer]'" in err
    assert "missing: torch" in err


def test_a_dependency_missing_later_names_the_extra(monkeypatch, capsys) -> None:
    def run_produce(args: argparse.Namespace) -> int:
        raise ModuleNotFoundError("No module named 'cv2'", name="cv2")

    monkeypatch.setattr("winnow.produce.run_produce", run_produce)
    assert cli.main(["produce", "frames/"]) == 2
    err = capsys.readouterr().err
    assert "winnow produce needs the produce extra: pip install 'winnow-stream[produce]'" in err


def test_a_missing_module_of_winnow_itself_is_not_blamed_on_an_extra(monkeypatch) -> None:
    def run_produce(args: argparse.Namespace) -> int:
        raise ModuleNotFoundError("No module named 'service.gone'", name="service.gone")

    monkeypatch.setattr("winnow.produce.run_produce", run_produce)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["produce", "frames/"])


def test_every_extra_named_by_a_command_is_checked() -> None:
    extras = {cli.build_parser().parse_args([*c, *_required(c)]).extra for c in COMMANDS} - {None}
    assert extras <= set(cli.EXTRA_MODULES)
    assert cli.missing_modules(None) == []


def _required(command: tuple[str, ...]) -> list[str]:
    return {
        ("model", "init"): ["--classes", "a,b", "--out", "m.onnx"],
        ("produce",): ["frames/"],
    }.get(command, [])
