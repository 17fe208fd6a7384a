"""Installs per role: the scorer and the label app run without the training stack.

The fast test imports the online roles' modules in the project's venv and checks
that no training or benchmark library came along. The slow ones build a fresh
venv with only one extra, installed from this checkout as a wheel (not
editable), and run the role through it: the scorer scores frames from a real
broker, the label app builds its pages.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kafka_helpers import produce, read_json
from winnow.cli import EXTRA_MODULES

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("infra", "schemas", "service", "trainer", "winnow")
TRAINING_STACK = ("torch", "torchvision", "sklearn", "cv2", "matplotlib", "onnxscript")
# What pip prints when it cannot reach the index (no network), as opposed to a bad requirement.
NETWORK_ERRORS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Max retries exceeded",
    "ConnectTimeoutError",
    "ReadTimeoutError",
)


def test_extras_of_the_cli_are_the_projects() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(EXTRA_MODULES) <= set(extras)
    assert {"scorer", "label-app", "trainer", "produce", "bench", "all", "dev"} <= set(extras)


def test_online_roles_do_not_import_the_training_stack() -> None:
    code = f"""
import json, sys
import service.pipeline.scorer, service.http.api, service.http.serve
import service.labeling.app, service.labeling.serve, service.labeling.label_studio
import winnow.cli
winnow.cli.build_parser()  # what `winnow serve` and `winnow label-app` load first
print(json.dumps([m for m in {TRAINING_STACK!r} if m in sys.modules]))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == []


# -- venvs with one extra ----------------------------------------------------------------
def _source_copy(dest: Path) -> Path:
    """The checkout's packages and metadata, so that building a wheel writes nothing here."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in PACKAGES:
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    return dest


def _env() -> dict[str, str]:
    """This environment without anything that would put the checkout on sys.path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _venv_with(extra: str, where: Path) -> Path:
    """A fresh venv under ``where`` with ``winnow-stream[extra]`` and its dependencies only."""
    source = _source_copy(where / "src")
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    python = venv / "bin" / "python"
    out = subprocess.run(
        [python, "-m", "pip", "install", "--progress-bar", "off", f"{source}[{extra}]"],
        cwd=where,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = out.stdout + out.stderr
    if out.returncode != 0 and any(e in log for e in NETWORK_ERRORS):
        pytest.skip(f"pip cannot reach the package index: {log.strip().splitlines()[-1]}")
    assert out.returncode == 0, log[-5000:]
    return python


def _run(python: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-c", code], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120
    )


def _absent(python: Path, cwd: Path, modules: tuple[str, ...]) -> list[str]:
    """The modules among ``modules`` that are installed in the venv of ``python``."""
    code = f"import importlib.util as u; print(*[m for m in {modules!r} if u.find_spec(m)])"
    out = _run(python, code, cwd)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.fixture(scope="module")
def scorer_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    where = tmp_path_factory.mktemp("scorer-install")
    try:
        yield _venv_with("scorer", where)
    finally:
        shutil.rmtree(where, ignore_errors=True)  # about 0.6 GB


@pytest.fixture(scope="module")
def label_app_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    where = tmp_path_factory.mktemp("label-app-install")
    try:
        yield _venv_with("label-app", where)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _digit_pngs(count: int) -> list[bytes]:
    from PIL import Image
    from sklearn.datasets import load_digits

    out = []
    for image in load_digits().images[:count] * (255 / 16):
        buffer = io.BytesIO()
        Image.fromarray(image.round().astype("uint8")).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_scorer_only_install_has_no_training_stack(scorer_python: Path, tmp_path) -> None:
    # The import of the issue, from the installed wheel rather than the checkout.
    out = _run(scorer_python, "import service.pipeline.scorer as s; print(s.__file__)", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "site-packages" in out.stdout
    assert _absent(scorer_python, tmp_path, TRAINING_STACK) == []
    assert "No module named 'torch'" in _run(scorer_python, "import torch", tmp_path).stderr

    assert _winnow(scorer_python, tmp_path, "serve", "--help").returncode == 0
    train = _winnow(scorer_python, tmp_path, "train", "--classes", "a,b")
    assert train.returncode == 2
    assert "winnow train needs the trainer extra: pip install 'winnow-stream[trainer]'" in (
        train.stderr
    )


def _winnow(python: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """The venv's ``winnow`` script."""
    return subprocess.run(
        [python.with_name("winnow"), *argv],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _start_serve(python: Path, model: Path, kafka_settings, log: Path) -> subprocess.Popen:
    env = {
        **_env(),
        "WINNOW_KAFKA_BOOTSTRAP": kafka_settings.bootstrap,
        "WINNOW_KAFKA_TOPIC_PREFIX": kafka_settings.topic_prefix,
        "WINNOW_KAFKA_SESSION_TIMEOUT_MS": str(kafka_settings.session_timeout_ms),
        "WINNOW_KAFKA_HEARTBEAT_INTERVAL_MS": str(kafka_settings.heartbeat_interval_ms),
        "WINNOW_SCORER_GROUP_ID": f"g-{kafka_settings.topic_prefix}",
        "WINNOW_SCORER_FOLLOW_RELEASES": "false",
        "WINNOW_DEVICE": "cpu",
    }
    with log.open("wb") as sink:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [python.with_name("winnow"), "serve", "--model", str(model), "--port", "0"],
            cwd=log.parent,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_a_scorer_only_install_scores_frames(
    scorer_python: Path, kafka_settings, winnow_topics, tmp_path: Path
) -> None:
    from trainer.model_init import init_model

    model = tmp_path / "digits.onnx"
    classes = [str(d) for d in range(10)]
    init_model(classes=classes, input_size=16, arch="small-cnn", out=model, channels=1, seed=0)
    log = tmp_path / "serve.log"
    serve = _start_serve(scorer_python, model, kafka_settings, log)
    try:
        frames = [
            (b"cam-1", png, [("frame-id", f"f{i}".encode()), ("content-type", b"image/png")])
            for i, png in enumerate(_digit_pngs(24))
        ]
        await produce(kafka_settings, winnow_topics.frames, frames)
        predictions = await read_json(
            kafka_settings,
            winnow_topics.predictions,
            lambda out: len({p["frame_id"] for p in out}) >= len(frames),
            within=120,
        )
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]
    assert {p["frame_id"] for p in predictions} == {f"f{i}" for i in range(len(frames))}
    for p in predictions:
        assert p["label"] in classes
        assert sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-3)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_label_app_only_install_renders_its_pages(label_app_python: Path, tmp_path) -> None:
    code = """
from infra.kafka.settings import KafkaSettings
from service.config import LabelAppSettings
from fastapi.templating import Jinja2Templates
from service.labeling import app as label_app
label_app.create_label_app(KafkaSettings(), LabelAppSettings(team_token="t" * 32))
templates = Jinja2Templates(directory=label_app.HERE / "templates")
for page in ("login.html", "label.html"):
    templates.get_template(page)
print("ok")
"""
    out = _run(label_app_python, code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok"]
    absent = (*TRAINING_STACK, "onnxruntime", "onnx")
    assert _absent(label_app_python, tmp_path, absent) == []
