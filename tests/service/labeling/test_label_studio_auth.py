"""Personal access tokens and legacy tokens against a real HTTP server shaped as Label Studio.

The server issues access tokens as Label Studio does (``POST /api/token/refresh/``
with ``{"refresh": <personal access token>}`` answers ``{"access": <JWT>}``)
and accepts ``Authorization: Bearer <access>`` while the test says they are
valid; the client's clock is the test's, so expiry edges need no sleeping.
The same flow against a real Label Studio is in ``test_label_studio.py``.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request

from service.labeling.label_studio_auth import (
    LabelStudioAuthError,
    LegacyTokenAuth,
    PersonalAccessTokenAuth,
    create_auth,
    jwt_claims,
    token_scheme,
)
from tests.service.labeling.http_server import ServerThread


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(claims: dict, secret: bytes = b"test-secret") -> str:
    """An HS256 JWT, as Label Studio's simplejwt signs them."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(signature)}"


PAT = make_jwt({"token_type": "refresh", "exp": 8103432616, "iat": 1796232616, "user_id": "1"})
LEGACY = "c0ffee" * 6 + "beef"  # 40 hex characters, as Label Studio's legacy tokens


@dataclass
class FakeLabelStudio:
    """What the server knows: its refresh tokens, live access tokens, and what it saw."""

    lifetime_s: int = 300
    server_clock_offset_s: float = 0.0  # Label Studio's clock against ours
    rotate: bool = False
    issue_dead: bool = False  # issued access tokens are refused (a deactivated user, say)
    refresh_tokens: set[str] = field(default_factory=lambda: {PAT})
    live: set[str] = field(default_factory=set)
    refreshes: list[str] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    issued: int = 0

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/ls/api/token/refresh/")
        async def refresh(request: Request) -> dict:
            token = (await request.json()).get("refresh")
            self.refreshes.append(token)
            if token not in self.refresh_tokens:
                raise HTTPException(401, "Token is invalid")
            self.issued += 1
            now = int(time.time() + self.server_clock_offset_s)
            claims = {"token_type": "access", "iat": now, "exp": now + self.lifetime_s}
            access = make_jwt({**claims, "jti": str(self.issued), "user_id": "1"})
            if not self.issue_dead:
                self.live.add(access)
            answer = {"access": access}
            if self.rotate:
                new = make_jwt({"token_type": "refresh", "jti": f"r{self.issued}"})
                self.refresh_tokens = {new}
                answer["refresh"] = new
            return answer

        @app.get("/ls/api/projects/")
        async def projects(request: Request) -> dict:
            given = request.headers.get("authorization", "")
            self.authorizations.append(given)
            if given.removeprefix("Bearer ") not in self.live and given != f"Token {LEGACY}":
                raise HTTPException(401, "Authentication credentials were not provided.")
            return {"count": 0, "results": []}

        return app


@pytest.fixture
def fake() -> Iterator[tuple[FakeLabelStudio, str]]:
    state = FakeLabelStudio()
    with ServerThread(state.app()) as server:
        yield state, f"{server.url}/ls"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _client(
    base: str, clock: Clock, token: str = PAT
) -> tuple[httpx.AsyncClient, PersonalAccessTokenAuth]:
    auth = PersonalAccessTokenAuth(token, f"{base}/api/token/refresh/", clock=clock)
    return httpx.AsyncClient(base_url=base, auth=auth, timeout=10), auth


def test_a_jwt_is_a_personal_access_token_and_anything_else_a_legacy_token() -> None:
    assert token_scheme(PAT) == "personal"
    assert token_scheme(LEGACY) == "legacy"
    assert token_scheme("a.b.c") == "legacy", "three dots are not a JWT"
    assert token_scheme(LEGACY, "personal") == "personal"
    assert token_scheme(PAT, "legacy") == "legacy"
    assert jwt_claims(PAT) == {
        "token_type": "refresh",
        "exp": 8103432616,
        "iat": 1796232616,
        "user_id": "1",
    }
    assert isinstance(create_auth(PAT, "auto", "http://ls"), PersonalAccessTokenAuth)
    assert isinstance(create_auth(LEGACY, "auto", "http://ls"), LegacyTokenAuth)


async def test_the_access_token_is_reused_until_shortly_before_it_expires(fake) -> None:
    state, base = fake
    clock = Clock()
    client, auth = _client(base, clock)
    async with client:
        for _ in range(3):
            assert (await client.get("/api/projects/")).status_code == 200
        assert state.refreshes == [PAT] and auth.refreshes == 1
        first = state.authorizations[0]
        assert first.startswith("Bearer ") and PAT not in first
        assert set(state.authorizations) == {first}
        clock.now += 300 - 31  # 31s left: still good
        await client.get("/api/projects/")
        assert auth.refreshes == 1
        clock.now += 2  # 29s left: refreshed before the request goes out
        await client.get("/api/projects/")
        assert auth.refreshes == 2 and state.authorizations[-1] != first
        assert len(state.authorizations) == 5, "no request was refused on the way"


async def test_a_short_lived_access_token_is_refreshed_halfway(fake) -> None:
    state, base = fake
    state.lifetime_s = 10  # shorter than the 30s margin: renew at half its life
    clock = Clock()
    client, auth = _client(base, clock)
    async with client:
        await client.get("/api/projects/")
        clock.now += 4.9
        await client.get("/api/projects/")
        assert auth.refreshes == 1
        clock.now += 0.2
        await client.get("/api/projects/")
        assert auth.refreshes == 2


async def test_label_studios_clock_does_not_matter(fake) -> None:
    state, base = fake
    state.server_clock_offset_s = -3 * 3600  # its clock is three hours behind: exp is "past"
    clock = Clock()
    client, auth = _client(base, clock)
    async with client:
        for _ in range(3):
            assert (await client.get("/api/projects/")).status_code == 200
        assert auth.refreshes == 1, "the lifetime is exp - iat, counted on the local clock"


async def test_a_401_refreshes_once_and_retries(fake) -> None:
    state, base = fake
    clock = Clock()
    client, auth = _client(base, clock)
    async with client:
        await client.get("/api/projects/")
        state.live.clear()  # Label Studio restarted with a new signing key, say
        response = await client.get("/api/projects/")
        assert response.status_code == 200
        assert auth.refreshes == 2 and len(state.authorizations) == 3


async def test_a_request_refused_after_a_refresh_is_not_retried_again(fake, caplog) -> None:
    state, base = fake
    clock = Clock()
    client, auth = _client(base, clock)
    caplog.set_level(logging.DEBUG)
    async with client:
        await client.get("/api/projects/")
        state.issue_dead = True
        state.live.clear()
        with pytest.raises(LabelStudioAuthError, match="WINNOW_LABEL_STUDIO_API_KEY"):
            await client.get("/api/projects/")
        assert auth.refreshes == 2 and len(state.authorizations) == 3, "one refresh, one retry"
    assert PAT not in caplog.text


async def test_a_refused_personal_access_token_names_the_setting(fake, caplog) -> None:
    state, base = fake
    caplog.set_level(logging.DEBUG)
    bad = make_jwt({"token_type": "refresh", "jti": "revoked"})
    client, _ = _client(base, Clock(), token=bad)
    async with client:
        with pytest.raises(LabelStudioAuthError) as refused:
            await client.get("/api/projects/")
    message = str(refused.value)
    assert "WINNOW_LABEL_STUDIO_API_KEY" in message and "Token is invalid" in message
    assert "Personal Access Token" in message
    assert bad not in message and bad not in caplog.text
    assert state.authorizations == [], "nothing was sent without a valid access token"


async def test_concurrent_requests_share_one_refresh(fake) -> None:
    state, base = fake
    client, auth = _client(base, Clock())
    async with client:
        answers = await asyncio.gather(*(client.get("/api/projects/") for _ in range(8)))
    assert [a.status_code for a in answers] == [200] * 8
    assert auth.refreshes == 1 and len(state.refreshes) == 1


async def test_a_rotated_refresh_token_is_kept(fake) -> None:
    state, base = fake
    state.rotate = True
    state.lifetime_s = 60
    clock = Clock()
    client, auth = _client(base, clock)
    async with client:
        await client.get("/api/projects/")
        clock.now += 60
        assert (await client.get("/api/projects/")).status_code == 200
    assert state.refreshes[0] == PAT and state.refreshes[1] != PAT
    assert auth.refreshes == 2


async def test_a_legacy_token_goes_as_token_and_a_refusal_says_what_to_do(fake) -> None:
    state, base = fake
    async with httpx.AsyncClient(base_url=base, auth=LegacyTokenAuth(LEGACY)) as client:
        assert (await client.get("/api/projects/")).status_code == 200
    assert state.authorizations == [f"Token {LEGACY}"] and state.refreshes == []
    async with httpx.AsyncClient(base_url=base, auth=LegacyTokenAuth("0" * 40)) as client:
        with pytest.raises(LabelStudioAuthError) as refused:
            await client.get("/api/projects/")
    assert "personal access token" in str(refused.value) and "0" * 40 not in str(refused.value)
