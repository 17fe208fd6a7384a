"""A simulated labeling team that works through the label app's own JSON API.

It signs in with the team token, takes a lease (``POST /api/next``), answers with the
dataset's true class (``POST /api/answer``), at most ``rate`` answers a second, as a
person at the page would; so the label app role does its real work.
"""

import asyncio
import http.cookiejar
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

_IDLE_S = 0.5


class AppLabelers:
    """Answers the label app's frames from ``truth(frame_id)`` (None: unlabelable)."""

    def __init__(
        self, url: str, token: str, truth: Callable[[str], str | None], rate: float
    ) -> None:
        self._url = url
        self._token = token
        self._truth = truth
        self._interval = 1 / rate if rate > 0 else 0.0
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), _NoRedirect()
        )
        self.answered = 0
        self.unlabelable = 0
        self.errors = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self._sign_in)
        self._task = asyncio.create_task(self._run(), name="soak-labelers")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _sign_in(self) -> None:
        body = urllib.parse.urlencode({"name": "soak-team", "token": self._token}).encode()
        request = urllib.request.Request(f"{self._url}/login", data=body, method="POST")
        try:
            self._opener.open(request, timeout=10).close()
        except urllib.error.HTTPError as error:  # the 303 to the page: signed in
            if error.code != 303:
                raise

    def _post(self, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self._url}{path}",
            data=json.dumps(payload or {}).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "X-Winnow-Csrf": "1"},
        )
        with self._opener.open(request, timeout=10) as response:
            answer: dict[str, Any] = json.load(response)
            return answer

    async def _run(self) -> None:
        next_free = time.monotonic()
        while True:
            try:
                lease = (await asyncio.to_thread(self._post, "/api/next"))["lease"]
            except (OSError, ValueError):
                self.errors += 1
                await asyncio.sleep(_IDLE_S)
                continue
            if lease is None:
                await asyncio.sleep(_IDLE_S)
                continue
            next_free = max(next_free, time.monotonic()) + self._interval
            await asyncio.sleep(max(0.0, next_free - time.monotonic()))
            truth = self._truth(lease["frame"]["frame_id"])
            answer: dict[str, Any] = {"lease_id": lease["lease_id"]}
            answer.update({"label": truth} if truth is not None else {"status": "unlabelable"})
            try:
                await asyncio.to_thread(self._post, "/api/answer", answer)
            except (OSError, ValueError):  # 409: the lease expired meanwhile
                self.errors += 1
                continue
            self.answered += 1
            self.unlabelable += truth is None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Keeps the sign-in's 303 (its cookie is what counts), instead of following it."""

    def redirect_request(self, *args: Any) -> None:
        return None
