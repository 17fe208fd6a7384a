"""Whether a model release may be served: size, sha256 and the HMAC signature.

A release is checked before anything loads it; :class:`ReleaseError` says why
one is refused, in a machine-readable ``reason`` that the API and the metrics
report.
"""

from typing import Literal

from schemas.models import ModelManifest
from schemas.release_codec import sha256_hex, verify_signature
from service.config import Settings
from service.errors import WinnowError

ReleaseReason = Literal[
    "checksum",
    "signature",
    "unsigned",
    "incomplete",
    "chunks",
    "replay",
    "load",
    "spec",
    "base",
    "unknown",
    "evicted",
]


class ReleaseError(WinnowError):
    """A release that cannot be served, and why (``reason``, machine-readable).

    Reasons: ``checksum`` (size or sha256 differ), ``signature`` (does not
    verify), ``unsigned`` (a key is configured but the release has no
    signature), ``incomplete`` (chunks missing), ``chunks`` (a chunk arrived
    twice with different bytes), ``replay`` (an older release published again
    after a newer one: see :mod:`service.model.watcher`), ``load`` (onnxruntime cannot
    load or run it, or a head-only release's head does not read), ``spec``
    (the file's spec, or the head's spec or base, disagrees with the
    manifest), ``base`` (a head-only release whose base release is not a
    verified full release the scorer keeps), ``unknown`` (no such verified
    version), ``evicted`` (its artifact, or its base's, is no longer kept).
    """

    def __init__(self, reason: ReleaseReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: ReleaseReason = reason
        self.detail = detail


def signing_key(settings: Settings) -> bytes | None:
    """The configured HMAC key's bytes (UTF-8 of ``WINNOW_MODEL_SIGNING_KEY``), or None."""
    secret = settings.model_signing_key
    value = secret.get_secret_value() if secret is not None else ""
    return value.encode("utf-8") if value else None


def verify_release(manifest: ModelManifest, artifact: bytes, signing_key: bytes | None) -> None:
    """Checks an assembled artifact against its manifest.

    Args:
        manifest: the release's manifest.
        artifact: the joined chunks.
        signing_key: the HMAC key's bytes; None skips the signature check.

    Raises:
        ReleaseError: ``checksum`` (size or sha256), ``unsigned`` or ``signature``.
    """
    if len(artifact) != manifest.size_bytes:
        raise ReleaseError(
            "checksum", f"artifact is {len(artifact)} bytes, manifest says {manifest.size_bytes}"
        )
    digest = sha256_hex(artifact)
    if digest != manifest.sha256:
        raise ReleaseError("checksum", f"sha256 is {digest}, manifest says {manifest.sha256}")
    if signing_key is None:
        return
    if not manifest.signature:
        raise ReleaseError("unsigned", "a signing key is configured but the release is unsigned")
    if not verify_signature(
        artifact,
        manifest.signature,
        signing_key,
        model_name=manifest.model_name,
        version=manifest.version,
    ):
        raise ReleaseError("signature", "the signature does not verify with the configured key")
