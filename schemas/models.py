"""Model releases on ``winnow.models`` (key: model name).

A release is one manifest record followed by its artifact in chunks of at most
1 MiB (no record over 1 MiB). The manifest carries the sha256 of the whole
artifact and, when a signing key is configured, an HMAC-SHA256 signature.

A full release's artifact is an ONNX file. A head-only release (its manifest
names a ``base_version``) carries a :class:`HeadArtifact` instead: the new
classification head as JSON, to be put on the backbone of the full release
``base_version``. Its base version and spec are inside the artifact, so the
sha256 and the signature cover them too.
"""

from datetime import datetime
from typing import Literal

from pydantic import Base64Bytes, BaseModel, Field, model_validator

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
    base_version: str | None = Field(
        default=None,
        description="set on a head-only release: the full release whose backbone the head "
        "belongs to; the artifact is then a head (model-head.schema.json), not an ONNX file",
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


HEAD_FORMAT: Literal["winnow-head-v1"] = "winnow-head-v1"
"""The ``format`` of a :class:`HeadArtifact`."""


class HeadArtifact(BaseModel):
    """The artifact of a head-only release: a linear head for a full release's backbone.

    The served model is the ONNX file of ``base_version`` whose probabilities
    are ``softmax(embedding @ weight.T + bias)``, with ``spec`` in its
    metadata; dropout (for MC-dropout committees) sits before the head, as in
    every Winnow model.
    """

    format: Literal["winnow-head-v1"] = HEAD_FORMAT
    base_version: str = Field(min_length=1, description="the full release of the backbone")
    spec: ModelSpec = Field(description="the spec of the model this head makes")
    weight: list[list[float]] = Field(description="classes x embedding_dim")
    bias: list[float] = Field(description="one per class")
    dropout: float = Field(ge=0, lt=1, description="the dropout rate before the head")

    @model_validator(mode="after")
    def _shapes(self) -> "HeadArtifact":
        classes, dim = len(self.spec.classes), self.spec.embedding_dim
        if len(self.weight) != classes or len(self.bias) != classes:
            raise ValueError(f"the head needs {classes} rows of weights and biases (one a class)")
        if any(len(row) != dim for row in self.weight):
            raise ValueError(f"every row of the head's weight needs {dim} values")
        return self
