"""What the scorer knows about releases: each one's status, and the artifacts kept for pinning.

The catalog is plain bookkeeping with no I/O: the watcher records what it
verified or refused here, and ``GET /v1/model`` reads the history from it.
It keeps the artifacts of the last few full releases, and those of the
head-only releases on them (a few kilobytes each): a head-only release can be
served, or pinned back, only while the artifact of its base is kept.

A manifest is kept only beside its artifact (it is what loading needs), and kept as
compressed JSON: its drift reference (400 sampled embeddings and the PCA) is about
6,800 Python objects, 220 KB parsed, so a history of 100 parsed manifests held 22 MB
that moved with the labels (the sample's size follows the holdout). History entries keep
what ``GET /v1/model`` and the checks need.
"""

import zlib
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


@dataclass(frozen=True)
class Release:
    """A release the catalog has seen: how the scorer judged it, and its identity."""

    info: ReleaseInfo
    sha256: str
    base_version: str | None  # set on a head-only release


@dataclass(frozen=True)
class _Kept:
    artifact: bytes
    manifest: bytes  # zlib-compressed JSON (see the module's doc)
    base: str | None  # a head-only release's base version


class ReleaseCatalog:
    """Release entries (oldest first), the last ``keep`` full artifacts and the heads on them.

    Args:
        keep: full releases whose artifacts are kept for pinning; the active
            one and the base of an active head-only release are never evicted.
            Head-only releases are kept while their base is, at most
            ``max_history`` of them.
        max_history: release entries kept.
        active: the version already serving, if any.
    """

    def __init__(self, keep: int = 5, max_history: int = 100, active: str | None = None) -> None:
        self.keep = max(1, keep)
        self.active = active
        self._max_history = max_history
        self._releases: OrderedDict[str, Release] = OrderedDict()
        self._artifacts: OrderedDict[str, _Kept] = OrderedDict()

    def get(self, version: str) -> Release | None:
        return self._releases.get(version)

    def artifact(self, version: str) -> bytes | None:
        """The kept artifact of ``version``, or None when never kept or evicted."""
        kept = self._artifacts.get(version)
        return kept.artifact if kept is not None else None

    def manifest(self, version: str) -> ModelManifest | None:
        """The manifest of a kept release, or None when never kept or evicted."""
        kept = self._artifacts.get(version)
        if kept is None:
            return None
        return ModelManifest.model_validate_json(zlib.decompress(kept.manifest))

    def base_of(self, version: str | None) -> str | None:
        """The base version of a head-only release (None for a full or unknown one)."""
        if version is None:
            return None
        kept = self._artifacts.get(version)
        if kept is not None:
            return kept.base
        release = self._releases.get(version)
        return release.base_version if release is not None else None

    def pinnable(self, version: str) -> bool:
        """Whether ``version`` can be served: its artifact, and its base's if any, are kept."""
        kept = self._artifacts.get(version)
        return kept is not None and (kept.base is None or kept.base in self._artifacts)

    def seen(self, manifest: ModelManifest) -> bool:
        """Whether this exact release (version and digest) was already accepted."""
        known = self._releases.get(manifest.version)
        return (
            known is not None
            and known.info.status != "rejected"
            and known.sha256 == manifest.sha256
        )

    def verified(self) -> list[ModelManifest]:
        """Manifests of the releases not rejected whose artifacts are kept, oldest first:
        those that can be served."""
        kept = (
            self.manifest(version)
            for version, release in self._releases.items()
            if release.info.status != "rejected"
        )
        return [manifest for manifest in kept if manifest is not None]

    def accept(self, manifest: ModelManifest, artifact: bytes) -> None:
        """Records a verified release and keeps its artifact, evicting the oldest kept ones."""
        self.record(manifest, "available", None)
        packed = zlib.compress(manifest.model_dump_json().encode(), 1)
        self._artifacts[manifest.version] = _Kept(artifact, packed, manifest.base_version)
        self._artifacts.move_to_end(manifest.version)
        spare = {manifest.version, self.active, self.base_of(self.active)}
        self._evict([v for v, k in self._artifacts.items() if k.base is None], self.keep, spare)
        self._evict([v for v, k in self._artifacts.items() if k.base], self._max_history, spare)

    def _evict(self, versions: list[str], keep: int, spare: set[str | None]) -> None:
        """Drops the oldest of ``versions`` not in ``spare`` down to ``keep``, and their heads."""
        evictable = [v for v in versions if v not in spare]
        for version in evictable[: max(0, len(versions) - keep)]:
            del self._artifacts[version]
            orphans = [v for v, k in self._artifacts.items() if k.base == version]
            for orphan in orphans:
                if orphan not in spare:
                    del self._artifacts[orphan]

    def reject(self, manifest: ModelManifest, reason: str) -> None:
        """Records a refused release and drops any artifact kept for it."""
        self._artifacts.pop(manifest.version, None)
        self.record(manifest, "rejected", reason)

    def record(self, manifest: ModelManifest, status: ReleaseStatus, reason: str | None) -> None:
        self._releases.pop(manifest.version, None)
        self._releases[manifest.version] = Release(
            ReleaseInfo.of(manifest, status, reason), manifest.sha256, manifest.base_version
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
                    update={"status": status, "pinnable": self.pinnable(version)}
                )
            )
        return out
