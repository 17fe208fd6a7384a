"""Release verification: size, sha256, and the HMAC signature when a key is set."""

import pytest

from service.model.verification import ReleaseError, verify_release
from trainer.release import build_release


def test_verify_release_checks_size_digest_and_signature(release_variant) -> None:
    artifact, spec = release_variant("s")
    manifest, _ = build_release(artifact, spec, b"k")
    verify_release(manifest, artifact, b"k")
    verify_release(manifest, artifact, None)
    cases = [
        (artifact[:-1], b"k", "checksum"),
        (artifact[:-1] + b"\x00", b"k", "checksum"),
        (artifact, b"other", "signature"),
    ]
    for data, key, reason in cases:
        with pytest.raises(ReleaseError) as error:
            verify_release(manifest, data, key)
        assert error.value.reason == reason
    unsigned = manifest.model_copy(update={"signature": None})
    with pytest.raises(ReleaseError) as error:
        verify_release(unsigned, artifact, b"k")
    assert error.value.reason == "unsigned"
