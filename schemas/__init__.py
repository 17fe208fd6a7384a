"""Wire contracts shared by every Winnow role.

Each Kafka topic and the HTTP API have pydantic models here; JSON Schema files
generated from them live in ``schemas/json`` for clients in other languages.
``service`` and ``trainer`` never import each other: this package is what they
share.
"""

from schemas.api import (
    FrameCounts,
    Health,
    ModelInfo,
    PolicyState,
    PolicyUpdate,
    Readiness,
    ScorerStatus,
)
from schemas.dead_letter import DeadLetter, DeadLetterReason
from schemas.drift import DriftEvent
from schemas.frames import FRAME_HEADERS, FrameHeaders, FrameOrigin
from schemas.ingest import IngestedFrame, IngestErrorDetail, IngestErrorResponse, IngestReceipt
from schemas.label_requests import LabelRequest
from schemas.labels import Label
from schemas.model_spec import ModelSpec
from schemas.models import ModelChunk, ModelManifest
from schemas.predictions import Prediction
from schemas.topics import TopicNames

__all__ = [
    "FRAME_HEADERS",
    "DeadLetter",
    "DeadLetterReason",
    "DriftEvent",
    "FrameCounts",
    "FrameHeaders",
    "FrameOrigin",
    "Health",
    "IngestErrorDetail",
    "IngestErrorResponse",
    "IngestReceipt",
    "IngestedFrame",
    "Label",
    "LabelRequest",
    "ModelChunk",
    "ModelInfo",
    "ModelManifest",
    "ModelSpec",
    "PolicyState",
    "PolicyUpdate",
    "Prediction",
    "Readiness",
    "ScorerStatus",
    "TopicNames",
]
