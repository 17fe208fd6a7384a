"""Pure helpers for model releases on ``winnow.models``, used by trainer and scorer.

Signature format (scheme ``winnow-release-v1``): the signature is the lowercase
hex HMAC-SHA256, keyed with the signing key's bytes (the UTF-8 of
``WINNOW_MODEL_SIGNING_KEY``), over the message::

    b"winnow-release-v1" NUL model_name NUL version NUL sha256_hex

where ``model_name`` and ``version`` are UTF-8 and ``sha256_hex`` is the
lowercase hex SHA-256 of the whole artifact (the ONNX file's bytes), and NUL is
one zero byte. Binding the name and version means a signature cannot be
replayed onto another release, and signing the digest rather than the bytes
lets any client verify a release with standard tools::

    printf 'winnow-release-v1\\0%s\\0%s\\0%s' NAME VERSION "$(sha256sum f.onnx | cut -c1-64)" \\
        | openssl dgst -sha256 -hmac "$KEY"
"""

import hashlib
import hmac

from schemas.models import MAX_CHUNK_BYTES

SIGNATURE_SCHEME = "winnow-release-v1"

MAX_RECORD_BYTES = 1024 * 1024
"""No record on ``winnow.models`` may be larger (the broker's default message limit)."""

CHUNK_BYTES = MAX_CHUNK_BYTES
"""Artifact bytes per chunk: base64 (4/3) plus the chunk's JSON fields stay under 1 MiB."""


def sha256_hex(data: bytes) -> str:
    """The lowercase hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def signing_message(model_name: str, version: str, sha256: str) -> bytes:
    """The exact bytes that a release signature authenticates (see the module docstring).

    Raises:
        ValueError: a field contains a NUL byte (the message would be ambiguous),
            or ``sha256`` is not 64 lowercase hex digits.
    """
    if "\0" in model_name or "\0" in version:
        raise ValueError("a model name or version may not contain a NUL character")
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a lowercase hex sha256: {sha256!r}")
    return "\0".join((SIGNATURE_SCHEME, model_name, version, sha256)).encode("utf-8")


def sign(artifact: bytes, key: bytes, *, model_name: str, version: str) -> str:
    """Signs a release: hex HMAC-SHA256 of :func:`signing_message` for this artifact.

    Args:
        artifact: the whole ONNX file.
        key: the signing key's bytes; must not be empty.
        model_name: the release's model name (the record key).
        version: the release's version.

    Returns:
        64 lowercase hex digits.

    Raises:
        ValueError: an empty key, or a name or version with a NUL character.
    """
    if not key:
        raise ValueError("the signing key is empty")
    message = signing_message(model_name, version, sha256_hex(artifact))
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def verify_signature(
    artifact: bytes, signature: str, key: bytes, *, model_name: str, version: str
) -> bool:
    """Whether ``signature`` is this release's signature under ``key`` (constant-time).

    A malformed signature, an empty key or an unsignable name simply does not verify.
    """
    try:
        expected = sign(artifact, key, model_name=model_name, version=version)
    except ValueError:
        return False
    # As bytes: compare_digest refuses str with non-ASCII, and a manifest may carry anything.
    return hmac.compare_digest(expected.encode(), signature.strip().lower().encode())


def split_chunks(artifact: bytes, max_bytes: int = CHUNK_BYTES) -> list[bytes]:
    """Splits an artifact into consecutive pieces of at most ``max_bytes``.

    Raises:
        ValueError: an empty artifact, or ``max_bytes`` < 1.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if not artifact:
        raise ValueError("an empty artifact cannot be released")
    return [artifact[i : i + max_bytes] for i in range(0, len(artifact), max_bytes)]
