"""The body of a refusal by the scorer's API (ingest has its own: ``schemas.ingest``)."""

from typing import Any

from pydantic import BaseModel


class ApiError(BaseModel):
    """``{"detail": ...}``: a sentence, or FastAPI's list of validation errors on a 422."""

    detail: str | list[dict[str, Any]]


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route that may refuse with these statuses, for its OpenAPI."""
    return {code: {"model": ApiError} for code in codes}


__all__ = ["ApiError", "error_responses"]
