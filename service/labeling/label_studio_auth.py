"""Label Studio's API credentials: personal access tokens and legacy tokens.

Label Studio (1.20 and later) gives each user a *personal access token*
(Account & Settings, Personal Access Token). It is a JWT refresh token: the
client trades it at ``POST /api/token/refresh/`` (body ``{"refresh": <token>}``)
for a short-lived access token (``{"access": <jwt>}``, five minutes by default)
and sends ``Authorization: Bearer <access>``. The *legacy token* (40 hex
characters, ``Authorization: Token <key>``) is refused unless an administrator
enabled legacy tokens for the organization (Organization, API Token Settings).

:func:`token_scheme` tells the two apart by shape, as Label Studio's own SDK
does: a token that parses as a JWT is a personal access token; anything else is
a legacy token. ``WINNOW_LABEL_STUDIO_AUTH_SCHEME`` overrides the guess.

Tokens are never logged; errors name the setting to fix.
"""

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any, ClassVar, Literal

import httpx

from infra.errors import WinnowError

log = logging.getLogger(__name__)

AuthScheme = Literal["auto", "personal", "legacy"]
TOKEN_SETTING = "WINNOW_LABEL_STUDIO_API_KEY"
SCHEME_SETTING = "WINNOW_LABEL_STUDIO_AUTH_SCHEME"
REFRESH_PATH = "/api/token/refresh/"


class LabelStudioAuthError(WinnowError):
    """Label Studio refused the configured token; a person has to change a setting.

    Retrying helps only once someone fixes the token (or the organization's
    token settings) in Label Studio, so callers retry slowly and log loudly.
    """

    retriable: ClassVar[bool] = False


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The (unverified) claims of a JWT; None if ``token`` is not shaped as one."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    try:
        header, claims = (json.loads(_b64url(part)) for part in parts[:2])
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(header, dict) or "alg" not in header or not isinstance(claims, dict):
        return None
    return claims


def token_scheme(token: str, scheme: AuthScheme = "auto") -> Literal["personal", "legacy"]:
    """Which scheme ``token`` uses: ``scheme`` unless it is ``auto``, else by its shape."""
    if scheme != "auto":
        return scheme
    return "personal" if jwt_claims(token) is not None else "legacy"


def _b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _detail(response: httpx.Response) -> str:
    """Label Studio's reason for a refusal (its ``detail``), never an echo of a token."""
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    detail = body.get("detail") if isinstance(body, dict) else None
    return f"HTTP {response.status_code}: {detail}" if detail else f"HTTP {response.status_code}"


class LegacyTokenAuth(httpx.Auth):
    """``Authorization: Token <key>``; a 401 becomes a :class:`LabelStudioAuthError`."""

    requires_response_body = True

    def __init__(self, token: str) -> None:
        self._header = f"Token {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        response = yield request
        if response.status_code == 401:
            raise LabelStudioAuthError(
                f"Label Studio refused the legacy token in {TOKEN_SETTING} ({_detail(response)}); "
                "current Label Studio disables legacy tokens by default: create a personal "
                "access token (Account & Settings, Personal Access Token) and set it instead"
            )


class PersonalAccessTokenAuth(httpx.Auth):
    """``Authorization: Bearer <access>``, the access token traded for a personal access token.

    The access token is refreshed before it expires (its lifetime is read from
    its own ``exp`` and ``iat`` claims and counted on the local monotonic clock,
    so clock skew between the hosts does not matter) and once more when Label
    Studio answers 401 anyway. Concurrent requests share one refresh.

    Args:
        token: the personal access token (a JWT refresh token).
        refresh_url: Label Studio's ``/api/token/refresh/`` URL.
        refresh_before_s: refresh this long before the access token expires
            (at most half its lifetime).
        clock: seconds on a monotonic clock (tests pass their own).
    """

    def __init__(
        self,
        token: str,
        refresh_url: str,
        refresh_before_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._refresh_token = token
        self._refresh_url = refresh_url
        self._refresh_before_s = refresh_before_s
        self._clock = clock
        self._access: str | None = None
        self._renew_at = float("-inf")
        self._lock = asyncio.Lock()
        self.refreshes = 0

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        raise RuntimeError("PersonalAccessTokenAuth works with httpx.AsyncClient only")
        yield request  # pragma: no cover - makes this a generator

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if self._access is None or self._clock() >= self._renew_at:
            async with self._lock:
                if self._access is None or self._clock() >= self._renew_at:
                    sent = self._clock()
                    answer = yield self._refresh_request()
                    await answer.aread()
                    self._take(answer, sent)
        used = self._access
        request.headers["Authorization"] = f"Bearer {used}"
        response = yield request
        if response.status_code != 401:
            return
        async with self._lock:
            if self._access == used:  # nobody refreshed since this request was sent
                sent = self._clock()
                answer = yield self._refresh_request()
                await answer.aread()
                self._take(answer, sent)
        request.headers["Authorization"] = f"Bearer {self._access}"
        response = yield request
        if response.status_code == 401:
            await response.aread()
            raise LabelStudioAuthError(
                f"Label Studio refused a fresh access token of the personal access token in "
                f"{TOKEN_SETTING} ({_detail(response)}); is its user still active?"
            )

    def _refresh_request(self) -> httpx.Request:
        return httpx.Request("POST", self._refresh_url, json={"refresh": self._refresh_token})

    def _take(self, response: httpx.Response, sent: float) -> None:
        """Takes the access token from a refresh answer to a request sent at ``sent``.

        Raises:
            LabelStudioAuthError: the personal access token was refused.
            httpx.HTTPStatusError: Label Studio failed otherwise (worth retrying).
        """
        if response.status_code in (400, 401, 403):
            raise LabelStudioAuthError(
                f"Label Studio refused the personal access token in {TOKEN_SETTING} "
                f"({_detail(response)}); create a new one (Account & Settings, Personal Access "
                f"Token), or set {SCHEME_SETTING}=legacy for a legacy token"
            )
        response.raise_for_status()
        try:
            body = response.json()
            access = body["access"]
        except (ValueError, KeyError, TypeError) as error:
            raise httpx.DecodingError(
                f"{REFRESH_PATH} answered without an access token", request=response.request
            ) from error
        if isinstance(body.get("refresh"), str):  # where Label Studio rotates refresh tokens
            self._refresh_token = body["refresh"]
        lifetime = _lifetime(jwt_claims(access) or {})
        margin = min(self._refresh_before_s, lifetime / 2)
        # counted from the request: the token was issued after it left, never before
        self._access, self._renew_at = access, sent + lifetime - margin
        self.refreshes += 1
        log.debug("Label Studio access token refreshed; valid for %.0fs", lifetime)


def _lifetime(claims: dict[str, Any]) -> float:
    """Seconds an access token is valid, from its claims (both on Label Studio's clock)."""
    exp, iat = claims.get("exp"), claims.get("iat")
    if isinstance(exp, int | float) and isinstance(iat, int | float) and exp > iat:
        return float(exp - iat)
    if isinstance(exp, int | float):  # no iat: trust our clock, as well as we can
        return max(float(exp) - time.time(), 0.0)
    return float("inf")  # no expiry: keep it until Label Studio answers 401


def create_auth(
    token: str, scheme: AuthScheme, base_url: str
) -> LegacyTokenAuth | PersonalAccessTokenAuth:
    """The httpx auth for ``token`` at Label Studio's ``base_url``."""
    if token_scheme(token, scheme) == "legacy":
        return LegacyTokenAuth(token)
    return PersonalAccessTokenAuth(token, base_url.rstrip("/") + REFRESH_PATH)
