"""A real Label Studio for tests: started from its own venv on loopback, offline, SQLite.

``scripts/setup.sh`` installs Label Studio into ``.venv-labelstudio`` (its
Django pins must not meet ours); ``WINNOW_LABEL_STUDIO_VENV`` points elsewhere.
The first user comes from ``LABEL_STUDIO_USERNAME`` / ``LABEL_STUDIO_PASSWORD``;
a test gets that user's personal access token as a person does in the UI:
sign in, then Account & Settings, Personal Access Token, Create
(``POST /api/token/`` in the signed-in session).
"""

import asyncio
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TypeVar

import httpx

from tests.service.labeling.http_server import free_port

REPO = Path(__file__).resolve().parents[3]
USERNAME = "admin@winnow.test"
PASSWORD = "winnow-test-password"
T = TypeVar("T")
_POLL_LINE = re.compile(r'"GET /api/[^"]*" 200 ')
START_TIMEOUT_S = 240.0  # about 45s on an idle laptop; two busy cores take longer


def label_studio_venv() -> Path:
    return Path(os.environ.get("WINNOW_LABEL_STUDIO_VENV") or REPO / ".venv-labelstudio")


def label_studio_missing() -> str | None:
    """Why Label Studio cannot run here, or None when it can."""
    executable = label_studio_venv() / "bin" / "label-studio"
    if not executable.exists():
        return (
            f"Label Studio is not installed at {executable} (scripts/setup.sh installs it; "
            "WINNOW_LABEL_STUDIO_VENV points elsewhere)"
        )
    return None


class LabelStudio:
    """``label-studio start`` in its own process group, with its log in ``log_path``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "label-studio.log"
        self.process: subprocess.Popen[bytes] | None = None

    def _env(self) -> dict[str, str]:
        drop = ("DJANGO_SETTINGS_MODULE", "PYTHONPATH", "VIRTUAL_ENV", "HOST", "PORT")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(
            LABEL_STUDIO_BASE_DATA_DIR=str(self.data_dir / "data"),
            LABEL_STUDIO_USERNAME=USERNAME,
            LABEL_STUDIO_PASSWORD=PASSWORD,
            # offline: no version check, analytics or error reporting
            LATEST_VERSION_CHECK="false",
            COLLECT_ANALYTICS="false",
            SENTRY_DSN="",
            FRONTEND_SENTRY_DSN="",
            # The webhook goes to the bridge on loopback, an address Label Studio's SSRF
            # protection refuses; a cluster-internal bridge needs the same (README).
            SSRF_PROTECTION_ENABLED="false",
            WEBHOOK_TIMEOUT="10",  # default 1s; the bridge answers once Kafka acknowledged
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self) -> None:
        """Starts Label Studio and waits for ``/health``.

        Raises:
            RuntimeError: it exited or did not answer in time (the message has its log).
        """
        executable = label_studio_venv() / "bin" / "label-studio"
        command = [str(executable), "start", "--no-browser"]
        command += ["--internal-host", "127.0.0.1", "--port", str(self.port)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.data_dir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends all of it
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Label Studio exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if b"is in use" in self.log_path.read_bytes():
                raise RuntimeError(  # it would move to another port; ours was taken meanwhile
                    f"port {self.port} was taken before Label Studio started:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Label Studio did not answer {self.url}/health within "
                    f"{START_TIMEOUT_S:.0f}s:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        """Ends Label Studio's process group: SIGTERM, then SIGKILL after 20s."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)

    def log_tail(self, lines: int = 80) -> str:
        """The log's last lines, without the successful GETs of a test's polling (a minute of
        them would push out the lines that say what went wrong)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no Label Studio log)"
        kept = [line for line in text.splitlines() if not _POLL_LINE.search(line)]
        return "\n".join(kept[-lines:])

    @contextmanager
    def log_on_failure(self) -> Iterator[None]:
        """Prints the end of Label Studio's log when the block fails (pytest shows it)."""
        try:
            yield
        except BaseException:
            print(f"--- Label Studio's log ({self.log_path}), last lines ---\n{self.log_tail()}")
            raise

    @asynccontextmanager
    async def signed_in(self) -> AsyncIterator[httpx.AsyncClient]:
        """A session signed in as the first user, as the login page does it."""
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            await client.get("/user/login/")  # sets the csrftoken cookie
            form = {
                "email": USERNAME,
                "password": PASSWORD,
                "csrfmiddlewaretoken": client.cookies.get("csrftoken") or "",
            }
            answer = await client.post("/user/login/", data=form)
            if answer.status_code != 302 or "sessionid" not in client.cookies:
                raise RuntimeError(f"could not sign in to Label Studio: HTTP {answer.status_code}")
            client.headers["X-CSRFToken"] = client.cookies.get("csrftoken") or ""
            yield client

    async def personal_access_token(self) -> str:
        """Creates the first user's personal access token (the UI's Create button)."""
        async with self.signed_in() as session:
            answer = await session.post("/api/token/")
        if answer.status_code != 201:
            raise RuntimeError(f"POST /api/token/: HTTP {answer.status_code} {answer.text}")
        return str(answer.json()["token"])

    async def legacy_token(self) -> str:
        """The first user's legacy token (refused unless the organization enables them)."""
        async with self.signed_in() as session:
            answer = await session.get("/api/current-user/token")
        answer.raise_for_status()
        return str(answer.json()["token"])


async def until(
    check: Callable[[], Awaitable[T]], what: str, within_s: float, every_s: float = 0.25
) -> T:
    """Awaits ``check()`` until it returns something truthy; fails naming ``what``."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {within_s:.0f}s (last: {result!r})")
        await asyncio.sleep(every_s)
