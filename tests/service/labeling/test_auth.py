"""Access to the labeling app: sign-in, sessions, CSRF and escaping."""

import pytest
from fastapi.testclient import TestClient

from service.config import LabelAppSettings
from service.errors import ConfigError
from service.labeling.app import create_label_app
from service.labeling.auth import COOKIE
from tests.service.labeling.conftest import (
    CSRF,
    label_request,
    next_lease,
    produce_requests,
    sign_in,
)


def test_no_tokens_configured_means_no_app(kafka_settings) -> None:
    with pytest.raises(ConfigError, match="TEAM_TOKEN"):
        create_label_app(kafka_settings, LabelAppSettings())


async def test_sign_in_and_what_anonymous_or_cross_site_requests_get(
    kafka_settings, winnow_topics, app_settings
) -> None:
    with TestClient(create_label_app(kafka_settings, app_settings())) as client:
        page = client.get("/", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/login"
        assert client.post("/api/next", headers=CSRF).status_code == 401
        assert (
            client.post(
                "/api/answer", json={"lease_id": "x", "label": "1"}, headers=CSRF
            ).status_code
            == 401
        )
        assert client.get("/api/stats").status_code == 401
        wrong = client.post("/login", data={"name": "mallory", "token": "guess"})
        assert wrong.status_code == 401 and "Wrong name or token" in wrong.text
        assert COOKIE not in client.cookies
        client.cookies.set(COOKIE, "eyJ1IjoiZXZlIiwiZSI6OTk5OTk5OTk5OX0.00")  # unsigned "eve"
        assert client.post("/api/next", headers=CSRF).status_code == 401
        client.cookies.clear()
        foreign = client.post(
            "/login",
            data={"name": "a", "token": "team-secret"},
            headers={"Origin": "https://evil.example"},
            follow_redirects=False,
        )
        assert foreign.status_code == 403

        response = client.post(
            "/login", data={"name": "alice", "token": "team-secret"}, follow_redirects=False
        )
        cookie = response.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert client.get("/api/stats").json()["name"] == "alice"
        assert client.post("/api/next").status_code == 403, "no CSRF header"
        cross = client.post("/api/next", headers={**CSRF, "Origin": "https://evil.example"})
        assert cross.status_code == 403
        assert (
            client.post("/api/next", headers={**CSRF, "Origin": "http://testserver"}).status_code
            == 200
        )

        sign_in(client, "ignored", token="carol-token")
        assert client.get("/api/stats").json()["name"] == "carol", "per-user tokens fix the name"
        assert "default-src 'none'" in client.get("/login").headers["content-security-policy"]


async def test_everything_rendered_is_escaped(kafka_settings, winnow_topics, app_settings) -> None:
    evil = "<script>alert(1)</script>"
    await produce_requests(
        kafka_settings, [label_request('x"><img src=x onerror=alert(2)>', 2, source_id=evil)]
    )
    with TestClient(create_label_app(kafka_settings, app_settings())) as client:
        sign_in(client, "<b>bold</b>")
        assert next_lease(client)["frame"]["source_id"] == evil  # the JSON carries it as data
        html = client.get("/").text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert evil not in html
        assert "<img src=x" not in html and "&lt;img src=x onerror=alert(2)&gt;" in html
        assert "&lt;b&gt;bold&lt;/b&gt;" in html and "<b>bold</b>" not in html
