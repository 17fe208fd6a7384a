"""The three measured roles as real ``winnow`` processes, each with its own pid.

The scorer (``winnow serve``, following the trainer's releases), the trainer
(``winnow train``) and the label app (``winnow label-app``) are started as the
deployment would start them, configured only through ``WINNOW_*`` variables and
flags, on one broker under a topic prefix of their own.
"""

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from infra.kafka.settings import KafkaSettings

ROLES = ("scorer", "trainer", "label-app")
START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 120.0
"""How long a role may take to stop after SIGTERM: the chart's longest grace period (the
trainer's; a round under way finishes first, which on a loaded machine took over 30 s)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class RoleOptions:
    """How the soak configures the roles (the rest is each role's default)."""

    classes: list[str]
    input_size: int
    channels: int
    device: str = "auto"
    round_labels: int = 20
    round_seconds: float = 120.0
    env: tuple[tuple[str, str], ...] = ()
    """More ``WINNOW_*`` settings for every role (``--role-env``), applied last."""

    @property
    def settings(self) -> dict[str, str]:
        """The settings every role gets beyond the soak's own: :data:`ROLE_DEFAULTS`, then
        ``env``."""
        return {**ROLE_DEFAULTS, **dict(self.env)}


SOAK_FETCH_MAX_WAIT_MS = 500
"""The scorer's fetch wait in a soak: with a shorter one the embedded broker starves the
scorer once its partition is large (``tests/service/pipeline/test_fetch_wait.py``)."""
ROLE_DEFAULTS = {"WINNOW_TRAINER_TORCH_THREADS": "1"}
"""Settings the soak gives the roles unless ``--role-env`` says otherwise. The three roles
share one machine's cores, and a trainer running torch's default (a thread per core) beside
the busy scorer spins: on 2 cores one round took 57 to 71 CPU-seconds with two threads and
4.1 with one (docs/benchmarks.md, "Torch threads")."""
MAX_RESTARTS = 3
"""Restarts of one role the soak makes, as an orchestrator would, before it gives up."""


@dataclass
class Role:
    name: str
    url: str
    ready_path: str
    process: subprocess.Popen[bytes]
    log_path: Path
    exit_code: int | None = None
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    restarts: list[dict[str, object]] = field(default_factory=list)
    """One entry per restart: the exit code and the last line the process logged."""

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def last_line(self) -> str:
        """The last line the role logged at WARNING or above, else its last line."""
        lines = [line for line in self.log_tail(20_000).splitlines() if line.strip()]
        loud = [line for line in lines if " ERROR " in line or " WARNING " in line]
        return (loud or lines or [""])[-1][-300:]


@dataclass
class Roles:
    """Starts the roles and stops them; ``label_token`` signs the simulated team in."""

    kafka: KafkaSettings
    options: RoleOptions
    work_dir: Path
    log_dir: Path
    label_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    roles: dict[str, Role] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)

    def start(self) -> None:
        """Starts the trainer first (the scorer serves its first release), then the others."""
        tag = secrets.token_hex(4)
        env = {
            **os.environ,
            "WINNOW_KAFKA_BOOTSTRAP": self.kafka.bootstrap or "",
            "WINNOW_KAFKA_TOPIC_PREFIX": self.kafka.topic_prefix,
            "WINNOW_KAFKA_SESSION_TIMEOUT_MS": str(self.kafka.session_timeout_ms),
            "WINNOW_KAFKA_HEARTBEAT_INTERVAL_MS": str(self.kafka.heartbeat_interval_ms),
            "WINNOW_SCORER_GROUP_ID": f"soak-scorer-{tag}",
            "WINNOW_TRAINER_GROUP_ID": f"soak-trainer-{tag}",
            "WINNOW_LABEL_APP_GROUP_ID": f"soak-label-app-{tag}",
            "WINNOW_LABEL_APP_TEAM_TOKEN": self.label_token,
            "WINNOW_TRAINER_ROUND_MIN_LABELS": str(self.options.round_labels),
            "WINNOW_TRAINER_ROUND_MAX_SECONDS": str(self.options.round_seconds),
            "WINNOW_POLICY_SEED": "0",
            "WINNOW_SCORER_FETCH_MAX_WAIT_MS": str(SOAK_FETCH_MAX_WAIT_MS),
            **self.options.settings,
        }
        o = self.options
        ports = {role: free_port() for role in ROLES}
        commands = {
            "trainer": ["train", "--classes", ",".join(o.classes), "--arch", "small-cnn",
                        "--input-size", str(o.input_size), "--channels", str(o.channels),
                        "--device", o.device, "--data-dir", str(self.work_dir / "trainer"),
                        "--metrics-port", str(ports["trainer"])],
            "scorer": ["serve", "--device", o.device, "--port", str(ports["scorer"])],
            "label-app": ["label-app", "--port", str(ports["label-app"])],
        }  # fmt: skip
        ready = {"trainer": "/metrics", "scorer": "/readyz", "label-app": "/metrics"}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in ("trainer", "scorer", "label-app"):
            log_path = self.log_dir / f"{name}.log"
            command = [sys.executable, "-m", "winnow.cli", *commands[name]]
            process = self._spawn(command, env, log_path)
            url = f"http://127.0.0.1:{ports[name]}"
            self.roles[name] = Role(name, url, ready[name], process, log_path, None, command, env)

    def _spawn(
        self, command: list[str], env: dict[str, str], log_path: Path
    ) -> "subprocess.Popen[bytes]":
        log = log_path.open("ab")  # a restarted role goes on in the same log
        self._logs.append(log)
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def restart(self, name: str, at_s: float) -> dict[str, object]:
        """Starts a role that exited again, as an orchestrator would; returns what is recorded.

        Raises:
            RuntimeError: the role is still running.
        """
        role = self.roles[name]
        code = role.process.poll()
        if code is None:
            raise RuntimeError(f"{name} is running")
        entry: dict[str, object] = {
            "at_s": round(at_s, 1),
            "exit_code": code,
            "last_line": role.last_line(),
        }
        role.restarts.append(entry)
        role.process = self._spawn(role.command, role.env, role.log_path)
        return entry

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Waits until each role answers its ready path with 200.

        Raises:
            RuntimeError: a role exited or did not become ready in time (with its log).
        """
        deadline = time.monotonic() + timeout_s
        for role in self.roles.values():
            while True:
                if role.process.poll() is not None:
                    raise RuntimeError(
                        f"{role.name} exited with {role.process.returncode}:\n{role.log_tail()}"
                    )
                try:
                    with urllib.request.urlopen(f"{role.url}{role.ready_path}", timeout=5):
                        break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"{role.name} not ready within {timeout_s:.0f} s:\n{role.log_tail()}"
                        ) from None
                    time.sleep(0.5)

    def dead(self) -> list[str]:
        """Roles whose process has exited."""
        return [r.name for r in self.roles.values() if r.process.poll() is not None]

    def stop(self) -> dict[str, int | None]:
        """SIGTERM to each role (the scorer first, so it drains), then their exit codes."""
        for name in ("scorer", "label-app", "trainer"):
            role = self.roles.get(name)
            if role is None:
                continue
            if role.process.poll() is None:
                role.process.send_signal(signal.SIGTERM)
                try:
                    role.process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    role.process.kill()
                    role.process.wait(timeout=10)
            role.exit_code = role.process.returncode
        for log in self._logs:
            log.close()
        return {name: role.exit_code for name, role in self.roles.items()}
