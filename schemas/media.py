"""Which image types Winnow accepts, and how a type is told from the leading bytes.

The one place that knows the signatures: the scorer's decoder, HTTP ingest,
label requests and the producer client all sniff through :func:`sniff`.
"""

from schemas.frames import CONTENT_TYPES, ContentType

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ALIASES: dict[str, ContentType] = {
    "image/jpeg": "image/jpeg",
    "image/jpg": "image/jpeg",
    "image/png": "image/png",
}
"""Media types a sender may declare, mapped to the accepted type they mean."""

# Signatures of image formats that are recognized but not accepted: (offset, bytes, name).
OTHER_FORMATS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (8, b"WEBP", "WebP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (0, b"\xff\x0a", "JPEG XL"),
    (0, b"qoif", "QOI"),
    (0, b"8BPS", "PSD"),
)

__all__ = [
    "ALIASES",
    "CONTENT_TYPES",
    "JPEG_MAGIC",
    "OTHER_FORMATS",
    "PNG_MAGIC",
    "other_format",
    "sniff",
]


def sniff(data: bytes) -> ContentType | None:
    """``image/jpeg`` or ``image/png`` from the signature; None for anything else."""
    if data.startswith(JPEG_MAGIC):
        return "image/jpeg"
    if data.startswith(PNG_MAGIC):
        return "image/png"
    return None


def other_format(data: bytes) -> str | None:
    """The name of a recognized but unaccepted image format (``GIF``, ``WebP``...), or None."""
    for offset, magic, name in OTHER_FORMATS:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None
