"""HTTP to a worker over its Unix socket, from the supervisor.

The scorer extra has no HTTP client, and the supervisor asks little (a handful
of requests per probe or scrape), so the standard library's ``http.client``
does it, on a thread, over the worker's socket.
"""

import asyncio
import http.client
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class WorkerUnreachable(Exception):
    """The worker did not answer: not listening yet, gone, or too slow."""


@dataclass(frozen=True)
class Answer:
    """A worker's answer: status and body."""

    status: int
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body)

    def detail(self) -> str:
        """The ``detail`` of an error answer (FastAPI's shape), or the body as text."""
        try:
            detail = self.json().get("detail", self.body.decode(errors="replace"))
        except (ValueError, AttributeError):
            detail = self.body.decode(errors="replace")
        return detail if isinstance(detail, str) else json.dumps(detail)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("worker", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


async def call(
    path: Path,
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,  # noqa: ASYNC109 (a socket timeout, on a thread)
) -> Answer:
    """One request to the worker listening on ``path``.

    Raises:
        WorkerUnreachable: no connection, a broken answer, or none within ``timeout``.
    """
    return await asyncio.to_thread(_call, path, method, url, body, headers or {}, timeout)


def _call(
    path: Path,
    method: str,
    url: str,
    body: bytes | None,
    headers: dict[str, str],
    timeout: float,
) -> Answer:
    connection = _UnixConnection(path, timeout)
    try:
        connection.request(method, url, body=body, headers=headers)
        response = connection.getresponse()
        return Answer(response.status, response.read())
    except (OSError, http.client.HTTPException) as error:
        raise WorkerUnreachable(f"{method} {url} over {path}: {error!r}") from error
    finally:
        connection.close()
