"""Assembling releases from manifests and chunks in any order."""

import base64

from schemas.model_spec import ModelSpec
from schemas.models import ModelChunk, ModelManifest
from service.model.assembler import ReleaseAssembler
from service.model.verification import verify_release
from trainer.release import build_release


def test_assembler_tolerates_duplicates_early_chunks_and_superseding_manifests(
    caplog,
) -> None:
    spec = ModelSpec(
        version="1",
        arch="x",
        classes=["a", "b"],
        input_size=(8, 8),
        channels=1,
        mean=[0.5],
        std=[0.5],
        embedding_dim=4,
    )
    first = b"A" * 100
    second = b"B" * 100
    m1, c1 = _release(first, spec)
    m2, c2 = _release(second, spec)
    asm = ReleaseAssembler(max_pending=2)
    assert asm.feed(b"{not json", "models", 0, 7) is None
    assert "topic=models partition=0 offset=7" in caplog.text
    assert asm.feed(_json(c1[1])) is None  # a chunk before its manifest is kept
    assert asm.feed(_json(m1)) is None
    assert asm.feed(_json(c1[1])) is None  # duplicate
    assert asm.feed(_json(m2)) is None  # same version, new artifact: supersedes
    assert asm.feed(_json(c2[1])) is None
    assert asm.take_refusals() == []
    got = asm.feed(_json(c2[0]))
    assert got is not None and got[0] == m2 and got[1] == second
    verify_release(got[0], got[1], None)
    assert asm.pending == 0
    for version in ("x1", "x2", "x3"):  # three models' releases, interleaved
        m, _ = _release(first, spec.model_copy(update={"version": version, "name": version}))
        asm.feed(_json(m))
    assert asm.pending == 2  # the oldest partial release was dropped


def _release(artifact: bytes, spec: ModelSpec) -> tuple[ModelManifest, list[ModelChunk]]:
    manifest, chunks = build_release(artifact, spec, None)
    size = len(artifact) // 2
    pieces = [artifact[:size], artifact[size:]]
    manifest = manifest.model_copy(update={"chunk_count": 2})
    chunks = [
        ModelChunk(
            model_name=manifest.model_name,
            version=spec.version,
            index=i,
            count=2,
            data=base64.b64encode(p),
        )
        for i, p in enumerate(pieces)
    ]
    return manifest, chunks


def _json(record: ModelManifest | ModelChunk) -> bytes:
    return record.model_dump_json().encode()


def _spec(version: str, name: str = "m") -> ModelSpec:
    return ModelSpec(
        name=name,
        version=version,
        arch="x",
        classes=["a", "b"],
        input_size=(8, 8),
        channels=1,
        mean=[0.5],
        std=[0.5],
        embedding_dim=4,
    )


def _chunked(artifact: bytes, spec: ModelSpec, size: int):
    manifest, chunks = build_release(artifact, spec, b"key")
    pieces = [artifact[i : i + size] for i in range(0, len(artifact), size)]
    manifest = manifest.model_copy(update={"chunk_count": len(pieces)})
    chunks = [
        ModelChunk(
            model_name=manifest.model_name,
            version=spec.version,
            index=i,
            count=len(pieces),
            data=base64.b64encode(p),
        )
        for i, p in enumerate(pieces)
    ]
    return manifest, chunks


def test_reordered_chunks_interleaved_with_another_release_are_put_together_by_index() -> None:
    """Catches chunks joined in arrival order rather than by their index (a valid release
    whose records a broker or a mirror reordered would be refused, or served wrong)."""
    artifact = bytes(range(256)) * 4
    manifest, chunks = _chunked(artifact, _spec("1"), 100)
    other_manifest, other_chunks = _chunked(b"other" * 50, _spec("9", name="other"), 60)
    asm = ReleaseAssembler()
    order = [chunks[7], chunks[0], other_chunks[1], chunks[10], *chunks[1:7], chunks[3]]
    for record in [other_manifest, *order, manifest, other_chunks[0], *chunks[8:10]]:
        got = asm.feed(_json(record))
    other = [asm.feed(_json(chunk)) for chunk in other_chunks[2:]][-1]
    assert got is not None and got[1] == artifact
    verify_release(got[0], got[1], b"key")
    assert other is not None and other[1] == b"other" * 50
    assert asm.take_refusals() == [] and asm.pending == 0


def test_a_chunk_repeated_with_different_bytes_refuses_the_release() -> None:
    """Catches a conflicting duplicate chunk being accepted (last or first copy wins):
    which copy belongs to the release cannot be told, so it is refused as 'chunks', and
    a clean publication after it is still put together."""
    artifact = bytes(range(200))
    manifest, chunks = _chunked(artifact, _spec("1"), 50)
    forged = chunks[2].model_copy(update={"data": b"x" * 50})
    asm = ReleaseAssembler()
    for record in [manifest, chunks[0], chunks[2], forged, chunks[1]]:
        assert asm.feed(_json(record)) is None
    (refusal,) = asm.take_refusals()
    assert (refusal.manifest, refusal.reason) == (manifest, "chunks")
    assert "chunk 2 of 4 arrived twice" in refusal.detail
    assert asm.feed(_json(chunks[3])) is None, "no release from the refused one's leftovers"
    done = [got for record in [manifest, *chunks] if (got := asm.feed(_json(record)))]
    assert [got[1] for got in done] == [artifact]


def test_missing_chunks_are_refused_when_the_next_release_begins_or_the_release_stalls() -> None:
    """Catches a release with missing chunks held silently forever (no reason, no metric):
    it is refused as 'incomplete', naming the missing chunks, once a newer release of the
    same model begins, or after stall_s with nothing new."""
    now = [0.0]
    asm = ReleaseAssembler(stall_s=60, clock=lambda: now[0])
    m1, c1 = _chunked(bytes(range(200)), _spec("1"), 50)
    m2, c2 = _chunked(bytes(range(100)), _spec("2"), 50)
    for record in [m1, c1[0], c1[3]]:
        asm.feed(_json(record))
    assert asm.feed(_json(m2)) is None
    (refusal,) = asm.take_refusals()
    assert (refusal.manifest.version, refusal.reason) == ("1", "incomplete")
    assert "chunks 1, 2 of 4 never arrived" in refusal.detail
    asm.feed(_json(c2[0]))
    now[0] = 59
    asm.expire()
    assert asm.take_refusals() == []
    now[0] = 61
    asm.expire()
    (stalled,) = asm.take_refusals()
    assert (stalled.manifest.version, stalled.reason) == ("2", "incomplete")
    assert "chunks 1 of 2 never arrived (no record of it for 61 s)" in stalled.detail
    assert asm.pending == 0
