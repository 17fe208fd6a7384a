"""The scorer's bearer tokens: refused at startup when unusable, compared in constant time.

``WINNOW_ADMIN_TOKEN`` guards every write of the API (policy, model pins) and may
post frames; ``WINNOW_INGEST_TOKENS`` may only post frames. A token that is set
but empty would let a request without any ``Authorization`` header through (an
empty bearer matches it), and one left at the documented example value
(``.env.example``) is known to everyone: the scorer refuses to start with either.
So with ``WINNOW_MODEL_SIGNING_KEY``: empty, it turned release verification off;
an example value lets anyone sign a release.
"""

import hmac
from collections.abc import Sequence

from service.config import Settings
from service.errors import ConfigError

EXAMPLE_TOKENS = frozenset({"change-me", "changeme", "change-me-admin", "change-me-ingest"})
"""Placeholder values of the examples (``.env.example``, the README); never accepted."""

_GENERATE = "generate one with `openssl rand -hex 32`"


def check_tokens(settings: Settings) -> None:
    """Refuses settings whose admin or ingest tokens or signing key are empty or an example.

    Raises:
        ConfigError: with the variable's name and what to do (never the value).
    """
    admin = settings.admin_token
    if admin is not None:
        _check("WINNOW_ADMIN_TOKEN", admin.get_secret_value(), "unset it to disable writes")
    key = settings.model_signing_key
    if key is not None:  # empty, it turned verification off without a word
        _check(
            "WINNOW_MODEL_SIGNING_KEY",
            key.get_secret_value(),
            "unset it to accept unsigned releases",
            empty_means="an empty key turns release verification off",
        )
    ingest = settings.ingest.tokens
    if ingest is not None:
        raw = ingest.get_secret_value()
        if not settings.ingest.token_list():
            _check("WINNOW_INGEST_TOKENS", raw, "unset it to leave ingest to the admin token")
        for token in settings.ingest.token_list():
            _check("WINNOW_INGEST_TOKENS", token, "remove that entry")


def _check(
    variable: str,
    value: str,
    otherwise: str,
    empty_means: str = "an empty bearer token would match a request without one",
) -> None:
    if not value.strip():
        raise ConfigError(
            f"{variable} is set but empty: {empty_means}; {_GENERATE}, or {otherwise}"
        )
    if value.strip().lower() in EXAMPLE_TOKENS:
        raise ConfigError(
            f"{variable} is the example value from the documentation, which anyone can read; "
            f"{_GENERATE}, or {otherwise}"
        )


def matching(given: str, allowed: Sequence[str]) -> str | None:
    """The token of ``allowed`` that ``given`` equals, or None; empty tokens never match.

    Every token is compared, each with :func:`hmac.compare_digest` on bytes, so the
    time taken does not tell which one nearly matched, or how much of it.
    """
    presented = given.encode()
    found = None
    for token in allowed:
        if hmac.compare_digest(presented, token.encode()) and token:
            found = found or token
    return found


__all__ = ["EXAMPLE_TOKENS", "check_tokens", "matching"]
