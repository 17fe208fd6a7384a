"""The HTTP ingest contract: error codes and the receipt."""

from typing import get_args

import pytest
from pydantic import ValidationError

from schemas.dead_letter import DeadLetterReason
from schemas.ingest import IngestErrorDetail, IngestErrorResponse, IngestReceipt


def test_every_decoder_reason_is_an_ingest_error_code() -> None:
    for reason in get_args(DeadLetterReason):
        assert IngestErrorDetail(error=reason, message="m").error == reason
    with pytest.raises(ValidationError):
        IngestErrorDetail(error="nope", message="m")  # type: ignore[arg-type]


def test_filename_is_in_the_body_only_when_the_error_is_about_an_image() -> None:
    body = {"detail": {"error": "truncated", "message": "cut short", "filename": None}}
    parsed = IngestErrorResponse.model_validate(body)
    assert parsed.model_dump(exclude_unset=True) == body
    general = {"detail": {"error": "rate_limited", "message": "slow down"}}
    assert IngestErrorResponse.model_validate(general).model_dump(exclude_unset=True) == general


def test_receipt_round_trips() -> None:
    receipt = {
        "topic": "winnow.frames",
        "source_id": "cam-1",
        "frame_ids": ["a"],
        "frames": [
            {"frame_id": "a", "partition": 0, "offset": 3, "content_type": "image/png", "bytes": 9}
        ],
    }
    assert IngestReceipt.model_validate(receipt).frames[0].filename is None
