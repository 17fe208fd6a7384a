"""Hostile requests against the scorer's HTTP API and ingest (schemathesis, in process)."""

from pydantic import SecretStr

from service.http.api import create_app
from service.model.inference import OnnxModel
from tests.hostile import fuzz_app

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
    tested = fuzz_app(app, headers, examples=30)
    assert "POST /v1/frames" in tested and "PUT /v1/policy" in tested
