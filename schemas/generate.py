"""Writes the JSON Schema files in ``schemas/json`` from the pydantic models.

Run ``python -m schemas.generate`` after changing a model; a test fails while
the committed files and the models disagree.
"""

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from schemas.api import ModelPin, ModelStatus, PolicyState, PolicyUpdate, ScorerStatus
from schemas.api_errors import ApiError
from schemas.dead_letter import DeadLetter
from schemas.drift import DriftEvent
from schemas.frames import FrameHeaders
from schemas.ingest import IngestErrorResponse, IngestReceipt
from schemas.label_requests import LabelRequest
from schemas.labels import Label
from schemas.model_spec import ModelSpec
from schemas.models import HeadArtifact, ModelChunk, ModelManifest
from schemas.predictions import Prediction

JSON_DIR = Path(__file__).parent / "json"

SCHEMAS: dict[str, type[BaseModel]] = {
    "frame-headers": FrameHeaders,
    "prediction": Prediction,
    "label-request": LabelRequest,
    "label": Label,
    "model-manifest": ModelManifest,
    "model-chunk": ModelChunk,
    "model-head": HeadArtifact,
    "model-spec": ModelSpec,
    "drift-event": DriftEvent,
    "dead-letter": DeadLetter,
    "api-policy-state": PolicyState,
    "api-policy-update": PolicyUpdate,
    "api-status": ScorerStatus,
    "api-model-status": ModelStatus,
    "api-model-pin": ModelPin,
    "api-ingest-receipt": IngestReceipt,
    "api-ingest-error": IngestErrorResponse,
    "api-error": ApiError,
}


def render(model: type[BaseModel]) -> str:
    """The JSON Schema of one model as committed: sorted keys, two-space indent."""
    schema = model.model_json_schema(mode="serialization")
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> int:
    JSON_DIR.mkdir(exist_ok=True)
    for name, model in SCHEMAS.items():
        (JSON_DIR / f"{name}.schema.json").write_text(render(model))
    print(f"wrote {len(SCHEMAS)} schema files to {JSON_DIR}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
