"""No log line of any role carries a token, a key or a SASL password (processes, slow).

Each role runs as ``winnow`` does in production, with debug logging, known
secret values in its environment and requests that use them (right and wrong);
everything the processes print is scanned for the values.
"""

import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.deploy.prometheus_tools import stop
from tests.kafka_proxy import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {
    "WINNOW_ADMIN_TOKEN": "adm-5e1b7c0d9a8f4e2b",
    "WINNOW_INGEST_TOKENS": "ing-3c9d2a7e6f1b8d40",
    "WINNOW_MODEL_SIGNING_KEY": "sig-8a2f6d1c4b7e9035",
    "WINNOW_LABEL_APP_TEAM_TOKEN": "team-0f7e3a9c2d5b6e18",
    "WINNOW_LABEL_APP_USER_TOKENS": "carol:usr-6b4d8e2f0a1c9d37",
    "WINNOW_LABEL_APP_SESSION_SECRET": "ses-2d9f4b6a8c0e1f53",
    "WINNOW_KAFKA_SASL_PASSWORD": "sasl-7c1e5a3f9b2d4e86",
}
VALUES = [v.split(":")[-1] for v in SECRETS.values()]


def _env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WINNOW_")}
    return {**base, **extra}


def _request(url: str, method: str = "GET", token: str | None = None, **kw) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers.update(kw.pop("headers", {}))
    request = urllib.request.Request(url, method=method, headers=headers, **kw)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def _wait(url: str, process: subprocess.Popen, within: float = 120) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited with {process.returncode}"
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise TimeoutError(url)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "winnow.cli", "-v", *args],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _demo(tmp_path: Path) -> str:
    """Scorer, trainer (signing releases) and simulated labelers, with API calls."""
    port, log = free_port(), tmp_path / "demo.log"
    secrets = {k: v for k, v in SECRETS.items() if "KAFKA" not in k}
    demo = _start(
        ["demo", "--max-frames", "300", "--rate", "50", "--http-port", str(port),
         "--plot", str(tmp_path / "demo.png"), "--json", str(tmp_path / "demo.json")],
        _env(**secrets), log,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(f"{url}/healthz", demo)
        policy = json.dumps({"budget": 0.2}).encode()
        put = {"method": "PUT", "data": policy, "headers": {"Content-Type": "application/json"}}
        assert _request(f"{url}/v1/policy", token="wrong", **put) == 401
        assert _request(f"{url}/v1/policy", token=SECRETS["WINNOW_ADMIN_TOKEN"], **put) == 200
        frame = {"method": "POST", "data": _png(), "headers": {"Content-Type": "image/png"}}
        ingest = f"{url}/v1/frames?source_id=cam-9"
        assert _request(ingest, token=SECRETS["WINNOW_INGEST_TOKENS"][:-1], **frame) == 401
        assert _request(ingest, token=SECRETS["WINNOW_INGEST_TOKENS"], **frame) == 201
        assert demo.wait(timeout=300) == 0
    finally:
        stop(demo)
    assert json.loads((tmp_path / "demo.json").read_text())["model_versions"] >= 2
    text = log.read_text()
    assert "release published" in text and "signed=True" in text, text[-3000:]
    return text


def _label_app(tmp_path: Path, bootstrap: str) -> str:
    """The label app: sign-ins with right and wrong team and user tokens."""
    port, log = free_port(), tmp_path / "label-app.log"
    secrets = {k: v for k, v in SECRETS.items() if "LABEL_APP" in k}
    app = _start(
        ["label-app", "--port", str(port)], _env(WINNOW_KAFKA_BOOTSTRAP=bootstrap, **secrets), log
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(f"{url}/healthz", app)
        form = {"method": "POST", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}
        for name, token, expected in [
            ("eve", "guess", 401),
            ("ann", SECRETS["WINNOW_LABEL_APP_TEAM_TOKEN"], 303),
            ("", "usr-6b4d8e2f0a1c9d37", 303),
        ]:
            data = f"name={name}&token={token}".encode()
            opener = urllib.request.build_opener(_NoRedirect())
            try:
                status = opener.open(urllib.request.Request(f"{url}/login", data=data, **form))
                code = status.status
            except urllib.error.HTTPError as error:
                code = error.code
            assert code == expected, (name, code)
    finally:
        stop(app)
    return log.read_text()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None


def _sasl(tmp_path: Path, bootstrap: str) -> str:
    """A role given SASL credentials the broker will not take: its errors, for a while."""
    log = tmp_path / "sasl.log"
    env = _env(
        WINNOW_KAFKA_BOOTSTRAP=bootstrap,
        WINNOW_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        WINNOW_KAFKA_SASL_MECHANISM="PLAIN",
        WINNOW_KAFKA_SASL_USERNAME="winnow",
        WINNOW_KAFKA_SASL_PASSWORD=SECRETS["WINNOW_KAFKA_SASL_PASSWORD"],
        WINNOW_LABEL_APP_TEAM_TOKEN=SECRETS["WINNOW_LABEL_APP_TEAM_TOKEN"],
    )
    app = _start(["label-app", "--port", str(free_port())], env, log)
    try:
        app.wait(timeout=25)  # the outage watch summarizes client errors every 20 s
    except subprocess.TimeoutExpired:
        pass
    finally:
        stop(app)
    return log.read_text()


def test_logs_of_every_role_never_print_tokens_keys_or_passwords(
    tmp_path: Path, kafka_broker
) -> None:
    """Catches a token, signing key, session secret or SASL password in any log line of
    the scorer, trainer, label app or Kafka clients (settings or client arguments logged,
    a header or form echoed in a refusal, a failed SASL handshake's error), at debug level."""
    logs = {
        "demo": _demo(tmp_path),
        "label-app": _label_app(tmp_path, kafka_broker.bootstrap),
        "sasl": _sasl(tmp_path, kafka_broker.bootstrap),
    }
    assert all(len(text) > 200 for text in logs.values()), {k: len(v) for k, v in logs.items()}
    for role, text in logs.items():
        for value in VALUES:
            assert value not in text, f"{role} printed a secret: ...{_around(text, value)}..."


def _around(text: str, value: str) -> str:
    at = text.index(value)
    return text[max(0, at - 200) : at + 50].replace(value, "<SECRET>")
