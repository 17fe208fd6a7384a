"""The release catalog: statuses, kept artifacts, eviction, history."""

import tracemalloc
from datetime import UTC, datetime

import numpy as np

from schemas.drift import DriftReference
from schemas.model_spec import ModelSpec
from schemas.models import ModelManifest
from service.model.catalog import ReleaseCatalog


def _manifest(version: str, sha: str = "0" * 64, base: str | None = None) -> ModelManifest:
    spec = ModelSpec(
        version=version,
        arch="x",
        classes=["a", "b"],
        input_size=(8, 8),
        channels=1,
        mean=[0.5],
        std=[0.5],
        embedding_dim=4,
    )
    return ModelManifest(
        model_name="winnow",
        version=version,
        created_at=datetime.now(UTC),
        sha256=sha,
        size_bytes=1,
        chunk_count=1,
        base_version=base,
        spec=spec,
    )


def test_keeps_the_last_artifacts_but_never_evicts_the_active_one() -> None:
    catalog = ReleaseCatalog(keep=2, active="v1")
    for version in ("v1", "v2", "v3"):
        catalog.accept(_manifest(version), version.encode())
    assert catalog.artifact("v1") == b"v1"  # active: kept although oldest
    assert catalog.artifact("v2") is None and catalog.artifact("v3") == b"v3"
    history = {h.version: h for h in catalog.history()}
    assert history["v1"].status == "active" and history["v1"].pinnable
    assert history["v2"].status == "available" and not history["v2"].pinnable


def test_a_rejected_release_is_not_verified_and_loses_its_artifact() -> None:
    catalog = ReleaseCatalog(keep=3)
    catalog.accept(_manifest("v1"), b"a")
    catalog.accept(_manifest("v2"), b"b")
    catalog.reject(_manifest("v2"), "load")
    assert [m.version for m in catalog.verified()] == ["v1"]
    assert catalog.artifact("v2") is None
    entry = catalog.get("v2")
    assert entry is not None and entry.info.status == "rejected" and entry.info.reason == "load"


def test_seen_means_the_same_version_and_digest_was_accepted() -> None:
    catalog = ReleaseCatalog()
    catalog.accept(_manifest("v1", "a" * 64), b"x")
    assert catalog.seen(_manifest("v1", "a" * 64))
    assert not catalog.seen(_manifest("v1", "b" * 64))  # a new artifact under the old version
    catalog.reject(_manifest("v2"), "checksum")
    assert not catalog.seen(_manifest("v2"))


def test_history_is_bounded_oldest_first() -> None:
    catalog = ReleaseCatalog(keep=1, max_history=3)
    for i in range(5):
        catalog.accept(_manifest(f"v{i}"), b"x")
    assert [h.version for h in catalog.history()] == ["v2", "v3", "v4"]


def test_heads_live_as_long_as_their_base_and_the_active_head_keeps_its_base() -> None:
    catalog = ReleaseCatalog(keep=1)
    catalog.accept(_manifest("v1"), b"v1")
    catalog.accept(_manifest("h1", base="v1"), b"h1")
    catalog.accept(_manifest("h2", base="v1"), b"h2")
    assert catalog.base_of("h2") == "v1" and catalog.base_of("v1") is None
    assert all(catalog.pinnable(v) for v in ("v1", "h1", "h2"))  # heads do not count in keep
    catalog.active = "h2"
    catalog.accept(_manifest("v2"), b"v2")  # over keep, but v1 is the active head's base
    assert catalog.artifact("v1") == b"v1" and catalog.pinnable("h1")
    catalog.active = "v2"
    catalog.accept(_manifest("v2-h1", base="v2"), b"x")  # now v1 goes, and its heads with it
    assert catalog.artifact("v1") is None and catalog.artifact("h1") is None
    assert not catalog.pinnable("h2") and catalog.pinnable("v2-h1")
    pinnable = {h.version: h.pinnable for h in catalog.history()}
    assert pinnable == {"v1": False, "h1": False, "h2": False, "v2": True, "v2-h1": True}


def _with_reference(manifest: ModelManifest, seed: int) -> ModelManifest:
    """The manifest with a drift reference of the trainer's default size (400 rows)."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(1_000, 64))
    probabilities = rng.dirichlet(np.ones(2), size=1_000)
    reference = DriftReference.build(embeddings, probabilities, seed=seed)
    spec = manifest.spec.model_copy(update={"embedding_dim": 64, "reference": reference})
    return manifest.model_copy(update={"spec": spec})


def test_a_kept_manifest_comes_back_equal_and_verified_lists_only_kept_ones() -> None:
    catalog = ReleaseCatalog(keep=1)
    first, second = _with_reference(_manifest("v1"), 1), _with_reference(_manifest("v2"), 2)
    catalog.accept(first, b"v1")
    assert catalog.manifest("v1") == first
    catalog.accept(second, b"v2")  # v1 evicted: it can no longer be served
    assert catalog.manifest("v1") is None
    assert catalog.verified() == [second]
    assert catalog.get("v1") is not None  # still in the history


def test_a_long_history_does_not_hold_parsed_manifests() -> None:
    """The failure it catches: every history entry holding its parsed manifest, whose
    drift reference is about 6,800 Python objects: 100 head releases held 22 MB in a soak
    and moved with the labels (the reference sample's size follows the holdout)."""
    records = [_with_reference(_manifest("v0"), 0).model_dump_json()] + [
        _with_reference(_manifest(f"h{i}", base="v0"), i).model_dump_json() for i in range(1, 101)
    ]
    tracemalloc.start()
    try:
        catalog = ReleaseCatalog(keep=5, max_history=100)
        before, _ = tracemalloc.get_traced_memory()
        for record in records:  # parsed as the watcher parses the models topic
            catalog.accept(ModelManifest.model_validate_json(record), b"artifact")
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(catalog.history()) == 100 and catalog.pinnable("h100")
    assert held < 8 * 2**20, f"{held / 2**20:.1f} MiB held by 100 releases"
