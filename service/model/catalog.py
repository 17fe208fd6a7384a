"""What the scorer knows about releases: each one's status, and the artifacts kept for pinning.

The catalog is plain bookkeeping with no I/O: the watcher records what it
verified or refused here, and ``GET /v1/model`` reads the history from it.
"""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from schemas.api import ReleaseEntry
from schemas.models import ModelManifest

ReleaseStatus = Literal["active", "available", "rejected"]  # as in schemas.api.ReleaseEntry


class ReleaseInfo(ReleaseEntry):
    """One release as the scorer saw it (the wire shape of ``GET /v1/model``'s history)."""

    @classmethod
    def of(
        cls, manifest: ModelManifest, status: ReleaseStatus, reason: str | None = None
    ) -> "ReleaseInfo":
        return cls(
            model_name=manifest.model_name,
            version=manifest.version,
            parent_version=manifest.parent_version,
            created_at=manifest.created_at,
            sha256=manifest.sha256,
            labels_trained=manifest.spec.labels_trained,
            metrics=manifest.spec.metrics,
            status=status,
            reason=reason,
        )


@dataclass
class Release:
    """A release the catalog has seen: its manifest and how the scorer judged it."""

    manifest: ModelManifest
    info: ReleaseInfo


class ReleaseCatalog:
    """Release entries (oldest first) and the last ``keep`` verified artifacts.

    Args:
        keep: verified artifacts kept for pinning; the active one is never evicted.
        max_history: release entries kept.
        active: the version already serving, if any.
    """

    def __init__(self, keep: int = 5, max_history: int = 100, active: str | None = None) -> None:
        self.keep = max(1, keep)
        self.active = active
        self._max_history = max_history
        self._releases: OrderedDict[str, Release] = OrderedDict()
        self._artifacts: OrderedDict[str, bytes] = OrderedDict()

    def get(self, version: str) -> Release | None:
        return self._releases.get(version)

    def artifact(self, version: str) -> bytes | None:
        """The kept artifact of ``version``, or None when never kept or evicted."""
        return self._artifacts.get(version)

    def seen(self, manifest: ModelManifest) -> bool:
        """Whether this exact release (version and digest) was already accepted."""
        known = self._releases.get(manifest.version)
        return (
            known is not None
            and known.info.status != "rejected"
            and known.manifest.sha256 == manifest.sha256
        )

    def verified(self) -> list[ModelManifest]:
        """Manifests of the releases not rejected, oldest first."""
        return [r.manifest for r in self._releases.values() if r.info.status != "rejected"]

    def accept(self, manifest: ModelManifest, artifact: bytes) -> None:
        """Records a verified release and keeps its artifact, evicting the oldest kept one."""
        self.record(manifest, "available", None)
        self._artifacts[manifest.version] = artifact
        self._artifacts.move_to_end(manifest.version)
        while len(self._artifacts) > self.keep:
            spare = (manifest.version, self.active)
            oldest = next((v for v in self._artifacts if v not in spare), None)
            del self._artifacts[oldest if oldest is not None else next(iter(self._artifacts))]

    def reject(self, manifest: ModelManifest, reason: str) -> None:
        """Records a refused release and drops any artifact kept for it."""
        self._artifacts.pop(manifest.version, None)
        self.record(manifest, "rejected", reason)

    def record(self, manifest: ModelManifest, status: ReleaseStatus, reason: str | None) -> None:
        self._releases.pop(manifest.version, None)
        self._releases[manifest.version] = Release(
            manifest, ReleaseInfo.of(manifest, status, reason)
        )
        while len(self._releases) > self._max_history:
            self._releases.popitem(last=False)

    def history(self) -> list[ReleaseInfo]:
        """Every release seen (oldest first), with its status and whether it can be pinned."""
        out = []
        for version, release in self._releases.items():
            status = "active" if version == self.active else release.info.status
            out.append(
                release.info.model_copy(
                    update={"status": status, "pinnable": version in self._artifacts}
                )
            )
        return out
