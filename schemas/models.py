"""Model releases on ``winnow.models`` (key: model name).

A release is one manifest record followed by its artifact in chunks of at most
1 MiB (no record over 1 MiB). The manifest carries the sha256 of the whole
artifact and, when a signing key is configured, an HMAC-SHA256 signature.
"""

from datetime import datetime
from typing import Literal

from pydantic import Base64Bytes, BaseModel, Field

from schemas.model_spec import ModelSpec

MAX_CHUNK_BYTES = 752 * 1024
"""Artifact bytes per chunk: base64 (4/3) plus the JSON around it stay under 1 MiB."""


class ModelManifest(BaseModel):
    """Announces a release; its chunks follow on the same topic and key."""

    kind: Literal["manifest"] = "manifest"
    model_name: str
    version: str
    parent_version: str | None = None
    created_at: datetime
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(gt=0)
    chunk_count: int = Field(gt=0)
    signature: str | None = Field(
        default=None,
        description="hex HMAC-SHA256 over 'winnow-release-v1' NUL model_name NUL version NUL "
        "sha256 (see schemas/release_codec.py)",
    )
    spec: ModelSpec


class ModelChunk(BaseModel):
    """One piece of a release's ONNX artifact."""

    kind: Literal["chunk"] = "chunk"
    model_name: str
    version: str
    index: int = Field(ge=0)
    count: int = Field(gt=0)
    data: Base64Bytes
