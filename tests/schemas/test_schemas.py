import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from schemas.frames import FrameHeaders, FrameOrigin, parse_timestamp
from schemas.generate import JSON_DIR, SCHEMAS, render
from schemas.labels import Label
from schemas.model_spec import ModelSpec


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_committed_json_schema_matches_model(name: str) -> None:
    path = JSON_DIR / f"{name}.schema.json"
    assert path.exists(), f"{path} missing: run `python -m schemas.generate`"
    assert path.read_text() == render(SCHEMAS[name]), (
        f"{path.name} is out of date with its model: run `python -m schemas.generate`"
    )


def test_no_stray_schema_files() -> None:
    names = {p.name.removesuffix(".schema.json") for p in JSON_DIR.glob("*.schema.json")}
    assert names == set(SCHEMAS)


def test_minimal_label_is_accepted() -> None:
    label = Label.model_validate_json('{"frame_id": "f1", "label": "cat"}')
    assert (label.frame_id, label.label, label.status) == ("f1", "cat", "labeled")


def test_labeled_status_needs_a_label() -> None:
    with pytest.raises(ValidationError):
        Label.model_validate({"frame_id": "f1"})
    unlabelable = Label.model_validate({"frame_id": "f1", "status": "unlabelable"})
    assert unlabelable.label is None


def test_frame_headers_parse_iso_and_epoch_millis() -> None:
    iso = FrameHeaders.from_kafka([("captured-at", b"2026-01-02T03:04:05Z"), ("x", b"y")])
    assert iso.captured_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    millis = FrameHeaders.from_kafka([("captured-at", b"1767323045000")])
    assert millis.captured_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_timestamp("not a time") is None


def test_frame_headers_round_trip() -> None:
    headers = FrameHeaders(
        frame_id="cam1-42", content_type="image/png", captured_at=datetime(2026, 1, 1, tzinfo=UTC)
    )
    assert FrameHeaders.from_kafka(headers.to_kafka()) == headers


def test_frame_id_derived_from_origin() -> None:
    assert FrameOrigin(topic="winnow.frames", partition=2, offset=7).frame_id() == (
        "winnow.frames:2:7"
    )


def test_model_spec_round_trips_through_onnx_metadata() -> None:
    spec = ModelSpec(
        version="v1",
        arch="small-cnn",
        classes=["a", "b"],
        input_size=(8, 8),
        channels=1,
        mean=[0.5],
        std=[0.5],
        embedding_dim=16,
    )
    assert ModelSpec.from_onnx_metadata(spec.to_onnx_metadata()) == spec
    with pytest.raises(ValueError, match=r"winnow\.spec"):
        ModelSpec.from_onnx_metadata({})


def test_model_spec_rejects_mismatched_normalization() -> None:
    with pytest.raises(ValidationError, match="one value per channel"):
        ModelSpec(
            version="v1",
            arch="x",
            classes=["a", "b"],
            input_size=(8, 8),
            channels=3,
            mean=[0.5],
            std=[0.5],
            embedding_dim=4,
        )


def test_schema_files_are_valid_json_with_titles() -> None:
    for path in JSON_DIR.glob("*.schema.json"):
        assert "title" in json.loads(path.read_text())
