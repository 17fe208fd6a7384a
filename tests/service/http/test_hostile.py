"""Hostile requests against the scorer's HTTP API and ingest (schemathesis, in process)."""

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.errors import ConfigError
from service.http.api import create_app
from service.http.tokens import matching
from service.model.inference import OnnxModel
from tests.hostile import fuzz_app, write_routes
from winnow.cli import main

ADMIN, INGEST = "admin-secret-1", "ingest-secret-1"


def _settings(scorer_settings):
    settings = scorer_settings()
    ingest = settings.ingest.model_copy(update={"tokens": SecretStr(INGEST), "rate": 0.0})
    return settings.model_copy(update={"admin_token": SecretStr(ADMIN), "ingest": ingest})


def test_generated_requests_get_no_5xx_and_answers_match_the_schema(
    scorer_settings, digits_model_path
) -> None:
    """Catches a 5xx, an unhandled exception, an undeclared status or a body off its schema
    on any route of the scorer (ingest included), with no, wrong, ingest or admin tokens."""
    app = create_app(_settings(scorer_settings), OnnxModel.load(digits_model_path, device="cpu"))
    headers = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {INGEST}"},
        {"Authorization": f"Bearer {ADMIN}"},
    ]
    tested = fuzz_app(app, headers, examples=60)
    assert "POST /v1/frames" in tested and "PUT /v1/policy" in tested


def test_every_write_route_refuses_without_its_token(scorer_settings, digits_model_path) -> None:
    """Catches a write route (any method but GET) added without the token check, a token
    compared loosely (a prefix, an empty bearer, the token with more after it), and the
    ingest token opening the admin routes. Routes are read from the app itself."""
    app = create_app(_settings(scorer_settings), OnnxModel.load(digits_model_path, device="cpu"))
    writes = write_routes(app)
    assert {("PUT", "/v1/policy"), ("POST", "/v1/frames"), ("POST", "/v1/model/pin")} <= set(writes)
    refused = [
        {},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {ADMIN[:-1]}"},
        {"Authorization": f"Bearer {ADMIN}x"},
        {"Authorization": f"Basic {ADMIN}"},
    ]
    with TestClient(app) as client:
        for method, path in writes:
            admin_only = path != "/v1/frames"
            tries = [*refused, {"Authorization": f"Bearer {INGEST}"}] if admin_only else refused
            for headers in tries:
                response = client.request(method, path, headers=headers, json={"version": "x"})
                assert response.status_code in (401, 403), (method, path, headers, response.text)
            good = client.request(
                method, path, headers={"Authorization": f"Bearer {ADMIN}"}, json={"version": "x"}
            )
            assert good.status_code not in (401, 403), (method, path, good.text)


@pytest.mark.parametrize("token", ["", "   ", "change-me", "CHANGE-ME"])
def test_an_empty_or_example_admin_token_refuses_to_start(
    scorer_settings, digits_model_path, token, capsys, monkeypatch
) -> None:
    """Catches a scorer that starts with an admin token anyone can present: an empty one
    (an empty bearer matched it, so a request without a token could write) or the example
    value of .env.example; and a refusal message that leaks the value or says nothing."""
    settings = scorer_settings().model_copy(update={"admin_token": SecretStr(token)})
    with pytest.raises(ConfigError, match="WINNOW_ADMIN_TOKEN") as refused:
        create_app(settings, OnnxModel.load(digits_model_path, device="cpu"))
    assert "openssl rand" in str(refused.value)
    monkeypatch.setenv("WINNOW_ADMIN_TOKEN", token)
    monkeypatch.setenv("WINNOW_KAFKA_BOOTSTRAP", "127.0.0.1:1")  # never reached
    assert main(["serve", "--model", str(digits_model_path)]) == 2
    err = capsys.readouterr().err
    assert "winnow serve: WINNOW_ADMIN_TOKEN is" in err
    assert token.strip() == "" or token not in err


def test_an_example_ingest_token_refuses_to_start(scorer_settings, digits_model_path) -> None:
    """Catches a scorer that accepts frames from anyone who read the example settings."""
    settings = scorer_settings()
    ingest = settings.ingest.model_copy(update={"tokens": SecretStr("good-one,change-me-ingest")})
    with pytest.raises(ConfigError, match="WINNOW_INGEST_TOKENS is the example value"):
        create_app(settings.model_copy(update={"ingest": ingest}), None)


def test_token_matching_is_exact_and_never_matches_an_empty_token() -> None:
    """Catches an empty configured token matching a request without one, and loose matches."""
    assert matching("", [""]) is None and matching("", ["", "a"]) is None
    assert matching("a", ["b", "a"]) == "a" and matching("ab", ["a"]) is None
    assert matching("é", ["e"]) is None  # non-ASCII is compared as bytes, not refused with 500


@pytest.mark.parametrize("key", ["", "change-me"])
def test_an_empty_or_example_signing_key_refuses_to_start(scorer_settings, key) -> None:
    """Catches a scorer started with WINNOW_MODEL_SIGNING_KEY set but empty (verification
    was silently off) or at the example value (anyone could sign a release)."""
    settings = scorer_settings().model_copy(update={"model_signing_key": SecretStr(key)})
    with pytest.raises(ConfigError, match="WINNOW_MODEL_SIGNING_KEY is"):
        create_app(settings, None)
