"""Hostile requests and hostile data against the label app: schema fuzzing, CSP, escaping."""

from html.parser import HTMLParser

import pytest
from fastapi import Response
from fastapi.testclient import TestClient
from pydantic import SecretStr

from infra.kafka.settings import KafkaSettings
from service.config import LabelAppSettings
from service.errors import ConfigError
from service.labeling.app import SECURITY_HEADERS, create_label_app
from service.labeling.auth import COOKIE, Sessions
from service.labeling.label_studio import LabelStudioSettings, create_bridge_app
from tests.hostile import fuzz_app, write_routes
from tests.service.labeling.conftest import (
    CSRF,
    act_as,
    label_request,
    next_lease,
    produce_requests,
    sign_in,
)

HOSTILE = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "javascript:alert(1)",
    "' onmouseover='alert(1)",
    "</textarea><svg onload=alert(1)>",
]


def _hostile_request(i: int):
    request = label_request(f"{HOSTILE[i % len(HOSTILE)]}-{i}", i, source_id=HOSTILE[-1 - i % 5])
    classes = [*HOSTILE, "3"]
    return request.model_copy(
        update={
            "classes": classes,
            "label": "3",
            "probabilities": {c: 1 / len(classes) for c in classes},
            "model_version": "<b>v1</b>",
            "content_type": 'javascript:alert(1)//"',
        }
    )


def _cookie(settings: LabelAppSettings, name: str) -> str:
    response = Response()
    Sessions(settings).set_cookie(response, name)
    return response.headers["set-cookie"].split(";")[0].split("=", 1)[1]


async def test_generated_requests_get_no_5xx_and_answers_match_the_schema(
    kafka_settings, winnow_topics, app_settings
) -> None:
    """Catches a 5xx, an unhandled exception, an undeclared status or a body off its schema
    on the label app's API, signed in or not, with or without the CSRF header, while the
    queue holds frames with hostile ids and class names."""
    await produce_requests(kafka_settings, [_hostile_request(i) for i in range(5)])
    settings = app_settings()
    cookie = {"Cookie": f"{COOKIE}={_cookie(settings, '<script>x</script>')}"}
    headers = [{}, CSRF, cookie, {**cookie, **CSRF}, {**cookie, **CSRF, "Origin": "http://evil"}]
    tested = fuzz_app(create_label_app(kafka_settings, settings), headers, examples=50)
    assert {"POST /api/next", "POST /api/answer", "POST /api/skip", "POST /api/undo"} <= set(tested)


class _Page(HTMLParser):
    """What a browser would run or follow in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.handlers: list[tuple[str, str]] = []
        self.urls: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts.append(dict(attrs))
        for name, value in attrs:
            if name.startswith("on"):
                self.handlers.append((tag, name))
            if name in ("src", "href", "action", "formaction") and value is not None:
                self.urls.append(value)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def _assert_safe(response, *shown: str) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value, name
    page = _parse(response.text)
    assert page.scripts == [{"src": "/static/label.js", "defer": None}] or page.scripts == []
    assert page.handlers == [], "an event handler attribute came from the data"
    for url in page.urls:
        assert url.startswith(("/", "data:image/png;base64,", "data:image/jpeg;base64,")), url
    text = "".join(page.text)
    for value in shown:
        assert value in text, f"{value!r} is not shown as text"


async def test_pages_keep_their_csp_and_escape_hostile_ids_sources_classes_and_names(
    kafka_settings, winnow_topics, app_settings
) -> None:
    """Catches markup injection through a frame id, source id, class name, model version,
    content type, labeler name or sign-in error (a <script>, an event handler, a
    javascript: URL), and a page served without its Content-Security-Policy."""
    await produce_requests(kafka_settings, [_hostile_request(0)])
    with TestClient(create_label_app(kafka_settings, app_settings())) as client:
        login = client.get("/login", params={"error": HOSTILE[0]})
        _assert_safe(login, HOSTILE[0])
        name = HOSTILE[1]
        labeler = sign_in(client, name)
        lease = next_lease(act_as(client, labeler))
        assert lease is not None and lease["frame"]["frame_id"] == f"{HOSTILE[0]}-0"
        assert lease["frame"]["image"].startswith("data:image/png;base64,")
        page = client.get("/")
        assert page.status_code == 200
        _assert_safe(page, name, f"{HOSTILE[0]}-0", HOSTILE[-1], *HOSTILE)
        classes = [
            attrs.get("data-label")
            for tag, attrs in _tags(page.text)
            if tag == "button" and "data-label" in attrs
        ]
        assert classes == [*HOSTILE, "3"], "class names reach the buttons intact, as text"
        for path in ("/api/next", "/api/stats"):
            api = client.request("POST" if path == "/api/next" else "GET", path, headers=CSRF)
            assert api.headers["content-type"] == "application/json"
            assert api.headers["X-Content-Type-Options"] == "nosniff"
        answer = client.post(
            "/api/answer", json={"lease_id": lease["lease_id"], "label": HOSTILE[2]}, headers=CSRF
        )
        assert answer.status_code == 200, answer.text


def _tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    out: list[tuple[str, dict[str, str | None]]] = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            out.append((tag, dict(attrs)))

    Tags().feed(html)
    return out


PUBLIC_WRITES = {("POST", "/login"), ("POST", "/logout")}
"""Sign-in takes the token itself; sign-out only clears the cookie (both check the origin)."""


async def test_every_write_route_refuses_without_a_session_and_the_csrf_header(
    kafka_settings, winnow_topics, app_settings
) -> None:
    """Catches a write route added without the session check or the CSRF check (routes
    read from the app, so a new one is covered), a forged or non-ASCII session cookie
    answered with a 500, and a cross-site sign-in."""
    settings = app_settings()
    app = create_label_app(kafka_settings, settings)
    writes = set(write_routes(app))
    assert {("POST", "/api/answer"), ("POST", "/api/next")} <= writes
    good = _cookie(settings, "alice")
    payload = good.split(".")[0]
    with TestClient(app) as client:
        for method, path in sorted(writes - PUBLIC_WRITES):
            client.cookies.clear()
            for cookie in (None, f"{payload}.{'0' * 64}", f"{payload}.é", "é", good):
                headers: dict[str, str | bytes] = {} if cookie == good else dict(CSRF)
                if cookie is not None:  # raw latin-1 bytes, as a browser may send them
                    headers["Cookie"] = f"{COOKIE}={cookie}".encode("latin-1")
                response = client.request(method, path, json={"lease_id": "x"}, headers=headers)
                expected = 403 if cookie == good else 401
                assert response.status_code == expected, (method, path, cookie, response.text)
            cross = client.request(
                method,
                path,
                json={"lease_id": "x"},
                headers={**CSRF, "Origin": "http://evil", "Cookie": f"{COOKIE}={good}"},
            )
            assert cross.status_code == 403, (method, path)
        client.cookies.clear()
        evil = client.post(
            "/login", data={"name": "x", "token": "team-secret"}, headers={"Origin": "http://e"}
        )
        assert evil.status_code == 403


@pytest.mark.parametrize("token", [None, "", "  "])
def test_the_label_studio_bridge_refuses_to_start_without_a_webhook_token(token) -> None:
    """Catches a bridge started with an empty webhook token, which any request sending
    'Authorization: Token ' would match."""
    with pytest.raises(ValueError, match="WINNOW_LABEL_STUDIO_WEBHOOK_TOKEN"):
        create_bridge_app(KafkaSettings(bootstrap="127.0.0.1:1"), _bridge_settings(token))


def test_every_write_route_of_the_label_studio_bridge_refuses_without_its_token() -> None:
    """Catches a write route of the bridge added without the webhook token check, or the
    token compared loosely (a prefix, the token alone without its scheme, more after it)."""
    app = create_bridge_app(KafkaSettings(bootstrap="127.0.0.1:1"), _bridge_settings("hook"))
    writes = write_routes(app)
    assert ("POST", "/webhook") in writes
    client = TestClient(app)  # no lifespan: the token is checked before anything runs
    for method, path in writes:
        for given in (None, "", "Token ", "Token hoo", "hook", "Token hookx", "Bearer hook"):
            headers = {} if given is None else {"Authorization": given}
            response = client.request(method, path, json={"action": "x"}, headers=headers)
            assert response.status_code == 401, (method, path, given)


def _bridge_settings(token: str | None) -> LabelStudioSettings:
    return LabelStudioSettings(
        url="http://label-studio.test",
        api_key=SecretStr("ls-key"),
        project_id=7,
        webhook_token=None if token is None else SecretStr(token),
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"team_token": SecretStr("change-me")},
        {"user_tokens": SecretStr("carol:ok-token,dan:change-me")},
        {"session_secret": SecretStr("CHANGE-ME")},
    ],
)
def test_the_label_app_refuses_example_tokens_and_secrets(app_settings, overrides) -> None:
    """Catches a label app started with a team token, user token or cookie-signing secret
    left at the example value of .env.example (anyone could sign in or forge a session)."""
    with pytest.raises(ConfigError, match="example value") as refused:
        create_label_app(KafkaSettings(bootstrap="127.0.0.1:1"), app_settings(**overrides))
    assert "change-me" not in str(refused.value).lower()
