"""Topic names, derived from one configurable prefix."""

from pydantic import BaseModel, ConfigDict


class TopicNames(BaseModel):
    """The names of Winnow's topics under a prefix (default ``winnow.``)."""

    model_config = ConfigDict(frozen=True)

    frames: str
    predictions: str
    label_requests: str
    labels: str
    models: str
    drift: str
    dead_letter: str

    @classmethod
    def with_prefix(cls, prefix: str = "winnow.") -> "TopicNames":
        return cls(
            frames=f"{prefix}frames",
            predictions=f"{prefix}predictions",
            label_requests=f"{prefix}label-requests",
            labels=f"{prefix}labels",
            models=f"{prefix}models",
            drift=f"{prefix}drift",
            dead_letter=f"{prefix}dead-letter",
        )

    def all(self) -> list[str]:
        return list(self.model_dump().values())
