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
    assert asm.feed(_json(c1[0])) is None
    assert asm.feed(_json(c2[0])) is None
    got = asm.feed(_json(c2[1]))
    assert got is not None and got[0] == m2 and got[1] == second
    verify_release(got[0], got[1], None)
    assert asm.pending == 0
    for version in ("x1", "x2", "x3"):
        m, _ = _release(first, spec.model_copy(update={"version": version}))
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
