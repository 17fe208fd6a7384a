"""Admin writes under ``--workers N``: every worker takes them, or none does.

A write (``PUT /v1/policy``, ``POST /v1/model/pin``, ``POST /v1/model/unpin``)
is refused with 503 while any worker is not running, since it would reach only
some. Otherwise the first worker takes it alone, so that a refusal (422, 404,
409: the same on every worker, which share settings and the models topic)
leaves every worker unchanged and is answered as that worker answered it; then
the others take it together. Should one of them still refuse or not answer,
the answer is 502 and names which workers took the change and which did not.

The writes that succeeded are kept (policy changes in order, the last pin or
unpin), and a worker that is started again after a failure is given them
before it counts as running (:meth:`AdminFanOut.replay`), so a restart does
not leave one worker on the settings of the environment while the others run
the operator's. A worker that cannot take them is failed and restarted.
"""

import asyncio
import logging
from dataclasses import dataclass

from pydantic import SecretStr

from service.workers.client import Answer, WorkerUnreachable, call
from service.workers.pool import Worker

log = logging.getLogger(__name__)

WRITE_TIMEOUT_S = 60.0
"""A pin loads and warms a model: it may take a while."""


class FanOutRefused(Exception):
    """A write that did not reach every worker; ``status`` is the HTTP answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Write:
    """One admin request, as forwarded to each worker."""

    method: str
    path: str
    body: bytes = b""


class AdminFanOut:
    """Forwards admin writes to every worker and replays them to restarted ones."""

    def __init__(self, admin_token: SecretStr | None) -> None:
        self._headers = {"Content-Type": "application/json"}
        if admin_token is not None:
            self._headers["Authorization"] = f"Bearer {admin_token.get_secret_value()}"
        self._policy: list[Write] = []
        self._model: Write | None = None  # the last pin or unpin
        self._lock = asyncio.Lock()  # a write and a replay never interleave

    async def apply(self, workers: list[Worker], write: Write) -> dict[int, Answer]:
        """Applies ``write`` on every worker; their answers by worker.

        Raises:
            FanOutRefused: a worker is not running (503), the first worker refused
                (its status; no worker changed), or only some took it (502).
        """
        async with self._lock:
            down = [f"{w.index} ({w.phase})" for w in workers if not w.running]
            if down:
                raise FanOutRefused(
                    503,
                    f"worker {', '.join(down)} is not running: the change would reach only "
                    "some workers, so none was changed; try again once /readyz answers 200",
                )
            first, *rest = workers
            answer = await self._send(first, write)
            if answer is None or not answer.ok:
                status = 503 if answer is None else answer.status
                why = "did not answer" if answer is None else answer.detail()
                raise FanOutRefused(status, why)
            answers = {first.index: answer}
            others = await asyncio.gather(*(self._send(worker, write) for worker in rest))
            answers |= {w.index: a for w, a in zip(rest, others, strict=True) if a is not None}
            failed = [w.index for w, a in zip(rest, others, strict=True) if a is None or not a.ok]
            if failed:
                took = [index for index, a in answers.items() if a.ok]
                details = "; ".join(
                    f"worker {w.index}: "
                    + ("no answer" if a is None else f"{a.status} {a.detail()}")
                    for w, a in zip(rest, others, strict=True)
                    if w.index in failed
                )
                log.error(
                    "%s %s reached workers %s only (%s)", write.method, write.path, took, details
                )
                raise FanOutRefused(
                    502,
                    f"workers {took} took the change and workers {failed} did not ({details}): "
                    "the workers now differ; repeat the request, or restart the scorer",
                )
            self._keep(write)
            return answers

    async def replay(self, worker: Worker) -> None:
        """Gives a (re)started worker the writes the others took.

        Raises:
            RuntimeError: the worker refused one or did not answer.
        """
        async with self._lock:
            writes = [*self._policy, *([self._model] if self._model else [])]
            for write in writes:
                answer = await self._send(worker, write)
                if answer is None or not answer.ok:
                    why = "no answer" if answer is None else f"{answer.status} {answer.detail()}"
                    raise RuntimeError(
                        f"it cannot take the admin change the other workers run "
                        f"({write.method} {write.path}: {why})"
                    )
            if writes:
                log.info("worker %d given the %d admin changes in force", worker.index, len(writes))

    def _keep(self, write: Write) -> None:
        if write.path.startswith("/v1/model"):
            self._model = write
        else:
            self._policy.append(write)

    async def _send(self, worker: Worker, write: Write) -> Answer | None:
        try:
            return await call(
                worker.socket,
                write.method,
                write.path,
                body=write.body or None,
                headers=self._headers,
                timeout=WRITE_TIMEOUT_S,
            )
        except WorkerUnreachable as error:
            log.warning("worker %d: %s", worker.index, error)
            return None
