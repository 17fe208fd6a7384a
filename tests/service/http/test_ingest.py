"""POST /v1/frames through the app's lifespan: frames land in Kafka, bad input is refused."""

import asyncio
import io
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr

from schemas.frames import FrameHeaders
from schemas.ingest import IngestErrorResponse, IngestReceipt
from service.config import IngestSettings, Settings
from service.http.api import create_app
from service.model.inference import OnnxModel
from tests.winnow.test_produce import read_records

TOKEN = "cam-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _image(fmt: str, size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def client_for(
    scorer_settings: Callable[..., Settings], digits_model_path
) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(admin_token: str | None = None, **ingest: object) -> TestClient:
        settings = scorer_settings().model_copy(
            update={
                "admin_token": SecretStr(admin_token) if admin_token else None,
                "ingest": IngestSettings(**ingest),  # type: ignore[arg-type]
            }
        )
        client = TestClient(create_app(settings, OnnxModel.load(digits_model_path, device="cpu")))
        client.__enter__()
        clients.append(client)
        client.app_settings = settings  # type: ignore[attr-defined]
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_raw_and_multipart_frames_land_in_kafka(client_for) -> None:
    client = client_for(tokens=SecretStr(f"other, {TOKEN}"))
    jpeg, png = _image("JPEG"), _image("PNG", seed=1)

    raw = client.post(
        "/v1/frames?source_id=cam-1&captured_at=2024-05-01T12:00:00Z",
        content=jpeg,
        headers={**AUTH, "Content-Type": "image/jpeg"},
    )
    assert raw.status_code == 201, raw.text
    receipt = raw.json()
    assert IngestReceipt.model_validate(receipt).frames[0].filename is None
    assert receipt["source_id"] == "cam-1" and len(receipt["frame_ids"]) == 1
    assert receipt["frames"][0]["content_type"] == "image/jpeg"
    assert receipt["frames"][0]["offset"] >= 0

    multi = client.post(
        "/v1/frames",
        data={"source_id": "cam-2", "captured_at": "1714564800000"},
        files=[
            ("files", ("a.png", png, "image/png")),
            ("files", ("b.jpg", jpeg, "application/octet-stream")),  # type sniffed
        ],
        headers=AUTH,
    )
    assert multi.status_code == 201, multi.text
    assert [f["filename"] for f in multi.json()["frames"]] == ["a.png", "b.jpg"]
    assert [f["content_type"] for f in multi.json()["frames"]] == ["image/png", "image/jpeg"]

    settings: Settings = client.app_settings  # type: ignore[attr-defined]
    records = asyncio.run(read_records(settings.kafka, settings.kafka.topics.frames, 3))
    by_id = {FrameHeaders.from_kafka(r.headers).frame_id: r for r in records}
    assert set(by_id) == {*receipt["frame_ids"], *multi.json()["frame_ids"]}

    first = by_id[receipt["frame_ids"][0]]
    headers = FrameHeaders.from_kafka(first.headers)
    assert first.key == b"cam-1" and first.value == jpeg
    assert headers.content_type == "image/jpeg"
    assert headers.captured_at is not None and headers.captured_at.isoformat().startswith(
        "2024-05-01T12:00:00"
    )
    assert (first.partition, first.offset) == (
        receipt["frames"][0]["partition"],
        receipt["frames"][0]["offset"],
    )
    a, b = (by_id[i] for i in multi.json()["frame_ids"])
    assert (a.key, a.value, b.key, b.value) == (b"cam-2", png, b"cam-2", jpeg)
    assert FrameHeaders.from_kafka(a.headers).content_type == "image/png"
    assert FrameHeaders.from_kafka(b.headers).captured_at == headers.captured_at


def test_bad_bodies_are_refused_with_clear_errors(client_for) -> None:
    client = client_for(tokens=SecretStr(TOKEN), max_body_bytes=50_000)
    url = "/v1/frames?source_id=cam-1"

    def post(body: bytes, content_type: str) -> dict:
        response = client.post(url, content=body, headers={**AUTH, "Content-Type": content_type})
        IngestErrorResponse.model_validate(response.json())  # the documented error body
        return {"status": response.status_code, **response.json()["detail"]}

    text = post(b"hello, not an image", "text/plain")
    assert text["status"] == 415 and "image/jpeg" in text["message"]
    assert "filename" not in text, "not about one image"
    lying = post(b"hello, not an image", "image/jpeg")
    assert lying["status"] == 415 and lying["error"] == "undecodable"
    assert lying["filename"] is None, "about the raw body"
    alias = client.post(url, content=_image("JPEG"), headers={**AUTH, "Content-Type": "image/jpg"})
    assert alias.status_code == 201 and alias.json()["frames"][0]["content_type"] == "image/jpeg"
    gif = post(b"GIF89a" + bytes(100), "image/png")
    assert gif["status"] == 415 and "GIF" in gif["message"]
    jpeg = _image("JPEG", size=(64, 48))
    cut = post(jpeg[: len(jpeg) // 2], "image/jpeg")
    assert cut["status"] == 422 and cut["error"] == "truncated" and "cut short" in cut["message"]
    mislabeled = post(_image("PNG"), "image/jpeg")
    assert mislabeled["status"] == 415 and "is image/png" in mislabeled["message"]

    big = _image("PNG", size=(200, 150))
    assert len(big) > 50_000
    too_big = post(big, "image/png")
    assert too_big["status"] == 413 and too_big["error"] == "too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    streamed = client.post(url, content=chunks(), headers={**AUTH, "Content-Type": "image/png"})
    assert streamed.status_code == 413, streamed.text

    no_source = client.post(
        "/v1/frames", content=jpeg, headers={**AUTH, "Content-Type": "image/jpeg"}
    )
    assert (
        no_source.status_code == 422 and no_source.json()["detail"]["error"] == "missing_source_id"
    )
    bad_time = client.post(
        url + "&captured_at=yesterday", content=jpeg, headers={**AUTH, "Content-Type": "image/jpeg"}
    )
    assert bad_time.status_code == 422
    text_part = client.post(url, files=[("files", ("x.txt", b"hi", "text/plain"))], headers=AUTH)
    assert text_part.status_code == 415 and text_part.json()["detail"]["filename"] == "x.txt"
    no_files = client.post(url, data={"source_id": "x"}, headers=AUTH)
    assert no_files.status_code in (415, 422)  # urlencoded form: not multipart


def test_tokens_are_required(client_for) -> None:
    client = client_for(admin_token="admin", tokens=SecretStr(TOKEN))
    jpeg = _image("JPEG")
    url = "/v1/frames?source_id=cam-1"
    body = {"content": jpeg, "headers": {"Content-Type": "image/jpeg"}}
    missing = client.post(url, **body)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = client.post(url, content=jpeg, headers={"Content-Type": "image/jpeg", **_bearer("x")})
    assert wrong.status_code == 401
    for token in (TOKEN, "admin"):
        ok = client.post(
            url, content=jpeg, headers={"Content-Type": "image/jpeg", **_bearer(token)}
        )
        assert ok.status_code == 201, ok.text

    spec = client.get("/openapi.json").json()
    answers = spec["paths"]["/v1/frames"]["post"]["responses"]
    assert answers["415"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/IngestErrorResponse"
    )

    closed = client_for()  # no ingest token and no admin token: writes refused
    refused = closed.post(url, content=jpeg, headers={"Content-Type": "image/jpeg", **AUTH})
    assert refused.status_code == 403
    assert "WINNOW_INGEST_TOKENS" in refused.json()["detail"]["message"]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_rate_limit_is_per_token_with_retry_after(client_for) -> None:
    client = client_for(tokens=SecretStr("a,b"), rate=0.5, burst=2)
    jpeg = _image("JPEG")
    url = "/v1/frames?source_id=cam-1"

    def post(token: str) -> int:
        headers = {"Content-Type": "image/jpeg", **_bearer(token)}
        response = client.post(url, content=jpeg, headers=headers)
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert response.json()["detail"]["error"] == "rate_limited"
        return response.status_code

    assert [post("a") for _ in range(3)] == [201, 201, 429]
    assert post("b") == 201  # another token has its own bucket
