"""Ingest's typed refusals: the status, body and headers each one answers with."""

import pytest

from service.errors import PoisonRecord
from service.http.ingest_errors import (
    RateLimited,
    TooLarge,
    Unauthorized,
    Unprocessable,
    UnsupportedMedia,
    decoder_refusal,
)

JPEG_START = b"\xff\xd8\xff\xe0" + bytes(16)


def test_refusals_carry_their_status_and_headers() -> None:
    limited = RateLimited("rate_limited", "slow down", retry_after_s=0.2).to_http()
    assert (limited.status_code, limited.headers) == (429, {"Retry-After": "1"})
    assert limited.detail == {"error": "rate_limited", "message": "slow down"}
    denied = Unauthorized("unauthorized", "who are you").to_http()
    assert (denied.status_code, denied.headers) == (401, {"WWW-Authenticate": "Bearer"})
    wrong = UnsupportedMedia("unsupported_type", "a GIF", filename="a.gif").to_http()
    assert wrong.status_code == 415 and wrong.detail["filename"] == "a.gif"
    assert RateLimited.retriable and not UnsupportedMedia.retriable


@pytest.mark.parametrize(
    ("reason", "data", "refusal", "status_code"),
    [
        ("unsupported_type", b"GIF89a" + bytes(16), UnsupportedMedia, 415),
        ("too_large", JPEG_START, TooLarge, 413),
        ("truncated", JPEG_START, Unprocessable, 422),
        ("undecodable", JPEG_START, Unprocessable, 422),  # a JPEG that is broken
        ("undecodable", b"hello, not an image", UnsupportedMedia, 415),  # no image at all
    ],
)
def test_a_decoder_refusal_is_answered_by_its_reason_and_the_bytes(
    reason: str, data: bytes, refusal: type, status_code: int
) -> None:
    answer = decoder_refusal(PoisonRecord(reason, "why"), data, "a.jpg")  # type: ignore[arg-type]
    assert type(answer) is refusal and answer.status_code == status_code
    assert answer.to_http().detail == {"error": reason, "message": "why", "filename": "a.jpg"}
