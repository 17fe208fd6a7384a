"""A librdkafka for Debian's kcat that can talk to the embedded broker.

Debian bookworm's kcat links librdkafka 2.0.2, which fails to parse the
ApiVersions v3 response of Tansu 0.6 (tagged fields; kcat reports "Read
underflow"). The ``confluent-kafka`` wheel bundles a current librdkafka under a
mangled file name; this module links it as ``librdkafka.so.1`` in a cache
directory, to be put on ``LD_LIBRARY_PATH``. ``python -m winnow.kcat_compat``
prints that directory.
"""

import os
import tempfile
from pathlib import Path


def librdkafka_dir() -> Path:
    """A directory holding ``librdkafka.so.1`` from the confluent-kafka wheel."""
    import confluent_kafka

    libs = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    candidates = sorted(libs.glob("librdkafka*.so.1"))
    if not candidates:
        raise FileNotFoundError(f"no bundled librdkafka in {libs}")
    target = Path(tempfile.gettempdir()) / f"winnow-librdkafka-{os.getuid()}"
    target.mkdir(exist_ok=True)
    link = target / "librdkafka.so.1"
    if not link.exists() or link.resolve() != candidates[0].resolve():
        tmp = target / f".link-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(candidates[0])
        tmp.replace(link)
    return target


if __name__ == "__main__":
    print(librdkafka_dir())
