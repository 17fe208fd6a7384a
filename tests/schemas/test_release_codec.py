"""The release codec: digests, signatures bound to name and version, chunking."""

import base64
import hashlib
import hmac
import json

import pytest

from schemas.models import ModelChunk
from schemas.release_codec import (
    CHUNK_BYTES,
    MAX_RECORD_BYTES,
    sha256_hex,
    sign,
    signing_message,
    split_chunks,
    verify_signature,
)

KEY = b"secret key"


def test_sha256_hex_is_lowercase_hex_of_the_bytes() -> None:
    assert sha256_hex(b"abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_signature_is_hmac_of_the_documented_message() -> None:
    artifact = b"onnx bytes"
    digest = hashlib.sha256(artifact).hexdigest()
    message = b"winnow-release-v1\x00digits\x001.2\x00" + digest.encode()
    assert signing_message("digits", "1.2", digest) == message
    expected = hmac.new(KEY, message, hashlib.sha256).hexdigest()
    assert sign(artifact, KEY, model_name="digits", version="1.2") == expected


def test_a_signature_verifies_only_for_its_key_artifact_name_and_version() -> None:
    signature = sign(b"model", KEY, model_name="digits", version="2")
    assert verify_signature(b"model", signature, KEY, model_name="digits", version="2")
    assert verify_signature(b"model", signature.upper(), KEY, model_name="digits", version="2")
    assert not verify_signature(b"model", signature, b"other", model_name="digits", version="2")
    assert not verify_signature(b"modeL", signature, KEY, model_name="digits", version="2")
    assert not verify_signature(b"model", signature, KEY, model_name="digits", version="3")
    assert not verify_signature(b"model", signature, KEY, model_name="xray", version="2")
    assert not verify_signature(b"model", "00" * 32, KEY, model_name="digits", version="2")
    assert not verify_signature(b"model", "", KEY, model_name="digits", version="2")


def test_ambiguous_or_keyless_signing_is_refused() -> None:
    with pytest.raises(ValueError, match="NUL"):
        sign(b"model", KEY, model_name="a\x00b", version="1")
    with pytest.raises(ValueError, match="empty"):
        sign(b"model", b"", model_name="a", version="1")
    with pytest.raises(ValueError, match="sha256"):
        signing_message("a", "1", "ABC")


def test_split_chunks_round_trips_and_respects_the_size() -> None:
    data = bytes(range(256)) * 100
    chunks = split_chunks(data, max_bytes=1000)
    assert b"".join(chunks) == data
    assert [len(c) for c in chunks] == [1000] * 25 + [600]
    assert split_chunks(b"x" * 2000, max_bytes=1000) == [b"x" * 1000] * 2
    with pytest.raises(ValueError):
        split_chunks(b"")
    with pytest.raises(ValueError):
        split_chunks(b"x", max_bytes=0)


def test_a_full_default_chunk_stays_under_one_mib_on_the_wire() -> None:
    (full, _) = split_chunks(b"\xff" * (CHUNK_BYTES + 1))
    chunk = ModelChunk(
        model_name="m" * 100,
        version="v" * 100,
        index=9999,
        count=10000,
        data=base64.b64encode(full),
    )
    wire = chunk.model_dump_json().encode()
    assert len(wire) <= MAX_RECORD_BYTES
    assert base64.b64decode(json.loads(wire)["data"]) == full


@pytest.mark.parametrize("signature", ["é" * 64, "\u00ff", "", "\x00" * 64, "zz"])
def test_a_malformed_signature_does_not_verify_and_does_not_raise(signature: str) -> None:
    """Catches a non-ASCII signature in a manifest raising TypeError from compare_digest
    (on str), which would stop the scorer's release watcher instead of refusing one release."""
    assert not verify_signature(b"artifact", signature, b"key", model_name="m", version="1")
