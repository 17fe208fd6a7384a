"""Sign-in, signed session cookies and CSRF checks of the labeling app.

Labelers sign in with the team token (and type their name) or with their own
token (the name comes with it). The session is a cookie holding the name and
an expiry, signed with HMAC-SHA256; it is HttpOnly and SameSite=Strict. Every
POST must also come from the app's own origin: a JSON API call carries the
``X-Winnow-Csrf`` header (a cross-site form cannot set it, and a cross-site
fetch that sets it needs a CORS preflight the app never grants), and a form
POST (sign-in, sign-out) must carry a matching ``Origin`` or ``Referer``.
"""

import base64
import hashlib
import hmac
import json
import secrets
import time
from urllib.parse import urlsplit

from fastapi import HTTPException, Request, Response, status

from service.config import LabelAppSettings
from service.errors import ConfigError
from service.http.tokens import EXAMPLE_TOKENS

COOKIE = "winnow_label_session"
CSRF_HEADER = "X-Winnow-Csrf"
MAX_NAME = 64


class Sessions:
    """Checks tokens and issues and reads session cookies."""

    def __init__(self, settings: LabelAppSettings) -> None:
        try:
            self._users = settings.token_users()
        except ValueError as error:
            raise ConfigError(str(error)) from error
        self._team = settings.team_token.get_secret_value() if settings.team_token else ""
        if not self._team and not self._users:
            raise ConfigError(
                "the labeling app needs WINNOW_LABEL_APP_TEAM_TOKEN or "
                "WINNOW_LABEL_APP_USER_TOKENS (name:token pairs): it takes no anonymous labels"
            )
        secret = settings.session_secret.get_secret_value() if settings.session_secret else ""
        _refuse_examples(
            WINNOW_LABEL_APP_TEAM_TOKEN=self._team,
            WINNOW_LABEL_APP_USER_TOKENS=",".join(self._users),
            WINNOW_LABEL_APP_SESSION_SECRET=secret,
        )
        self._key = (secret or secrets.token_hex(32)).encode()
        self.max_age = settings.session_max_age_s
        self.secure = settings.cookie_secure

    def sign_in(self, name: str, token: str) -> str | None:
        """The labeler's name if the token is good, else None."""
        given = token.strip().encode()
        found = None
        for user_token, user in self._users.items():  # every one: no early exit to time
            if hmac.compare_digest(given, user_token.encode()):
                found = found or user
        if found is not None:
            return found
        name = " ".join(name.split())[:MAX_NAME]
        team = hmac.compare_digest(given, self._team.encode())  # always compared
        return name if self._team and name and team else None

    def set_cookie(self, response: Response, name: str) -> None:
        body = json.dumps({"u": name, "e": int(time.time()) + self.max_age}).encode()
        payload = base64.urlsafe_b64encode(body).decode().rstrip("=")
        value = f"{payload}.{self._sign(payload)}"
        response.set_cookie(
            COOKIE,
            value,
            max_age=self.max_age,
            httponly=True,
            samesite="strict",
            secure=self.secure,
            path="/",
        )

    def clear_cookie(self, response: Response) -> None:
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")

    def user(self, request: Request) -> str | None:
        """The signed-in labeler, or None (no cookie, bad signature, expired)."""
        value = request.cookies.get(COOKIE, "")
        payload, _, signature = value.partition(".")
        # As bytes: compare_digest refuses str with non-ASCII (a hostile cookie would be a 500).
        if not payload or not hmac.compare_digest(signature.encode(), self._sign(payload).encode()):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("e", 0) < time.time():
            return None
        name = data.get("u")
        return name if isinstance(name, str) and name else None

    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()


def _refuse_examples(**values: str) -> None:
    """A token or secret left at an example value (``.env.example``) is known to everyone.

    Raises:
        ConfigError: naming the variable, never the value.
    """
    for variable, value in values.items():
        if any(v.strip().lower() in EXAMPLE_TOKENS for v in value.split(",")):
            raise ConfigError(
                f"{variable} holds the example value from the documentation, which anyone "
                "can read; generate one with `openssl rand -hex 32`"
            )


def same_origin(request: Request) -> bool:
    """Whether the request's Origin (or Referer) is this app's own, when one is sent."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return source is None
    parts = urlsplit(source)
    return parts.netloc == request.headers.get("host", "") and parts.scheme in ("http", "https")


def check_api_post(request: Request) -> None:
    """Refuses a JSON POST without the CSRF header or from another origin (403)."""
    if request.headers.get(CSRF_HEADER) != "1" or not same_origin(request):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "cross-site request refused")


def labeler(request: Request) -> str:
    """FastAPI dependency: the signed-in labeler (401 otherwise); POSTs are CSRF-checked."""
    sessions: Sessions = request.state.sessions  # the label app's lifespan state
    name = sessions.user(request)
    if name is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "sign in first")
    if request.method != "GET":
        check_api_post(request)
    return name
