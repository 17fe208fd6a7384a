"""How HTTP ingest refuses a request: typed refusals that carry their HTTP status.

Each refusal is a :class:`IngestRefused` whose class names the status (401,
403, 413, 415, 422, 429, 503, ...) and whose instance carries the
machine-readable code and message of ``schemas.ingest``. Handlers and their
dependencies raise them; :class:`IngestRoute`, the router's route class, turns
one into the answer ``{"detail": {"error", "message"[, "filename"]}}`` with its
headers, so no handler matches on error text.
"""

import math
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

from fastapi import HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from infra.errors import WinnowError
from schemas.dead_letter import DeadLetterReason
from schemas.ingest import IngestErrorCode, IngestErrorDetail, IngestErrorResponse
from schemas.media import sniff
from service.errors import PoisonRecord


class IngestRefused(WinnowError):
    """A request that ingest refuses; the class says which HTTP status answers it.

    Args:
        error: the machine-readable code of the answer.
        message: the human-readable explanation.
        retry_after_s: when to try again (``Retry-After``), if worth saying.
        **about: ``filename=...`` for an error about one image (None: the raw body).
    """

    status_code: ClassVar[int] = status.HTTP_422_UNPROCESSABLE_CONTENT

    def __init__(
        self,
        error: IngestErrorCode,
        message: str,
        *,
        retry_after_s: float | None = None,
        **about: str | None,
    ) -> None:
        super().__init__(message)
        self.detail = IngestErrorDetail(error=error, message=message, **about)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str] | None:
        """The answer's headers (``Retry-After``; ``WWW-Authenticate`` for 401)."""
        if self.retry_after_s is None:
            return None
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def to_http(self) -> HTTPException:
        """The answer: this status, ``{"detail": {"error", "message"[, "filename"]}}``."""
        detail = self.detail.model_dump(mode="json", exclude_unset=True)
        return HTTPException(self.status_code, detail, headers=self.headers())


class BadRequest(IngestRefused):
    status_code = status.HTTP_400_BAD_REQUEST


class Unauthorized(IngestRefused):
    status_code = status.HTTP_401_UNAUTHORIZED

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(IngestRefused):
    status_code = status.HTTP_403_FORBIDDEN


class TooLarge(IngestRefused):
    status_code = status.HTTP_413_CONTENT_TOO_LARGE


class UnsupportedMedia(IngestRefused):
    status_code = status.HTTP_415_UNSUPPORTED_MEDIA_TYPE


class Unprocessable(IngestRefused):
    status_code = status.HTTP_422_UNPROCESSABLE_CONTENT


class RateLimited(IngestRefused):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    retriable = True


class Unavailable(IngestRefused):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    retriable = True


_REFUSAL_OF_REASON: dict[DeadLetterReason, type[IngestRefused]] = {
    "unsupported_type": UnsupportedMedia,
    "too_large": TooLarge,
}
"""How a decoder refusal is answered; any other reason is a broken image (422)."""


def decoder_refusal(error: PoisonRecord, data: bytes, filename: str | None) -> IngestRefused:
    """The answer to an image the scorer's decoder refused.

    Bytes without a JPEG or PNG signature at all (a text file sent as
    image/jpeg) are the wrong media (415), not a broken image (422).
    """
    refusal = _REFUSAL_OF_REASON.get(error.reason, Unprocessable)
    if error.reason == "undecodable" and sniff(data) is None:
        refusal = UnsupportedMedia
    return refusal(error.reason, error.detail, filename=filename)


def invalid_parameters(error: RequestValidationError) -> Unprocessable:
    """A query parameter FastAPI refused (``source_id`` too long...), in ingest's error shape."""
    problems = [
        f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', 'invalid')}"
        for e in error.errors()[:5]
    ]
    return Unprocessable("invalid_parameter", "; ".join(problems) or "invalid request")


class IngestRoute(APIRoute):
    """Answers an :class:`IngestRefused` raised by a handler or a dependency.

    FastAPI's own validation errors are answered in the same shape
    (``invalid_parameter``), so every refusal matches ``IngestErrorResponse``.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except IngestRefused as refusal:
                raise refusal.to_http() from refusal
            except RequestValidationError as error:
                raise invalid_parameters(error).to_http() from error

        return answer


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": IngestErrorResponse} for code in (400, 401, 403, 413, 415, 422, 429, 503)
}
"""The refusals in the OpenAPI document: every one has the same body."""


__all__ = [
    "ERROR_RESPONSES",
    "BadRequest",
    "Forbidden",
    "IngestRefused",
    "IngestRoute",
    "RateLimited",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "Unprocessable",
    "UnsupportedMedia",
    "decoder_refusal",
]
