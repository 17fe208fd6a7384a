"""The model contract: what an ONNX file must say about itself.

The trainer writes a ``ModelSpec`` as JSON into the ONNX metadata under
``winnow.spec``; the scorer reads it to know the input size, channels,
normalization and class names. The graph has one input, ``image``
(float32, N x C x H x W, values normalized as ``(x / 255 - mean) / std``), and
two outputs, ``probabilities`` (N x classes) and ``embedding`` (N x D), float32 too.
Inside the graph the arithmetic is float32 or, with ``precision`` fp16, float16 (half the
file, and tensor cores on a GPU); the input and outputs stay float32 either way.
"""

import json
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from schemas.drift import DriftReference

SPEC_KEY = "winnow.spec"
"""ONNX metadata key of the model's :class:`ModelSpec` (JSON)."""
HEAD_KEY = "winnow.head"
"""ONNX metadata key of the linear head and its dropout rate (JSON), written by the trainer's
export and read by the scorer for MC-dropout committees."""
INPUT_NAME = "image"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_EMBEDDING = "embedding"

Precision = Literal["fp32", "fp16"]
"""The arithmetic inside a model's graph (:attr:`ModelSpec.precision`)."""


class ModelSpec(BaseModel):
    """Input spec, classes and provenance of one model version."""

    name: str = "winnow"
    version: str
    parent_version: str | None = None
    arch: str
    classes: list[str] = Field(min_length=2)
    input_size: tuple[int, int] = Field(description="height, width in pixels")
    channels: Literal[1, 3]
    mean: list[float]
    std: list[float]
    embedding_dim: int = Field(gt=0)
    backbone_version: str | None = Field(
        default=None,
        description="the full release whose backbone (all but the linear head) this model has: "
        "its own version for a full release, the base for a head-only release; null: its own",
    )
    labels_trained: int = Field(default=0, ge=0, description="labels this version learned from")
    labels_unlearned: int | None = Field(
        default=None,
        ge=0,
        description="answered labels (the holdout excluded) the trainer held when it published "
        "this version and this version had not learned from; null when not counted",
    )
    precision: Precision = Field(
        default="fp32",
        description="the arithmetic inside the graph (weights and activations); its input and "
        "outputs are float32 either way",
    )
    metrics: dict[str, float] = Field(default_factory=dict)
    reference: DriftReference | None = Field(
        default=None, description="statistics of the training data, for drift detection"
    )

    @property
    def backbone(self) -> str:
        """The version of the backbone; a model that does not say has its own."""
        return self.backbone_version or self.version

    @model_validator(mode="after")
    def _per_channel(self) -> "ModelSpec":
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("class names must be unique")
        return self

    def to_onnx_metadata(self) -> dict[str, str]:
        return {SPEC_KEY: self.model_dump_json()}

    @classmethod
    def from_onnx_metadata(cls, metadata: dict[str, str]) -> "ModelSpec":
        if SPEC_KEY not in metadata:
            raise ValueError(
                f"the ONNX model has no '{SPEC_KEY}' metadata; write it with `winnow model init`"
            )
        return cls.model_validate(json.loads(metadata[SPEC_KEY]))
