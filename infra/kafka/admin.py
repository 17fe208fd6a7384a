"""Topic administration and broker reachability.

Winnow creates its topics itself, with the configured partition count, rather
than relying on auto-creation: some brokers (Tansu among them) create a topic
with their own default partition count the moment any client asks for its
metadata, and a frames topic with the wrong partition count caps how far the
scorer can scale out.
"""

import asyncio
import logging
import time
from collections.abc import Iterable

from aiokafka import AIOKafkaClient, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.cluster import ClusterMetadata
from aiokafka.errors import (
    InvalidPartitionsError,
    InvalidReplicationFactorError,
    KafkaError,
    TopicAlreadyExistsError,
    for_code,
)

from infra.errors import BrokerError, ConfigError
from infra.kafka.connection import client_kwargs
from infra.kafka.settings import KafkaSettings

log = logging.getLogger(__name__)

VERIFY_TIMEOUT_S = 10.0
"""How long created topics may take to show up in metadata."""


async def ensure_topics(
    settings: KafkaSettings, topics: Iterable[str], partitions: int | None = None
) -> None:
    """Creates the topics that do not exist yet; existing ones are left as they are.

    Every new topic gets ``settings.replication_factor`` replicas; the broker
    refuses more replicas than it has brokers, and the error names the setting.

    Args:
        settings: the cluster, with ``partitions`` and ``replication_factor``.
        topics: topic names.
        partitions: partitions of each new topic; ``settings.partitions`` if None.

    Raises:
        ConfigError: the connection settings are inconsistent, or ``partitions`` < 1.
        BrokerError: the broker is unreachable, refused to create a topic (e.g.
            a replication factor above its broker count), or a topic is still
            missing from metadata after ``VERIFY_TIMEOUT_S``.
    """
    names = list(dict.fromkeys(topics))
    if not names:
        return
    count = partitions if partitions is not None else settings.partitions
    if count < 1:
        raise ConfigError(f"a topic needs at least one partition, not {count}")
    new = [NewTopic(name, count, settings.replication_factor) for name in names]
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    try:
        await admin.start()
        response = await admin.create_topics(new)
    except KafkaError as exc:
        raise BrokerError(f"cannot create topics on {settings.bootstrap}: {exc!r}") from exc
    finally:
        await admin.close()
    _check_created(response.topic_errors, settings, count)
    cluster = await _wait_for_topics(settings, names)
    for name in names:
        found = len(cluster.partitions_for_topic(name) or ())
        if found != count:
            log.warning("topic %s exists with %s partitions, not %s", name, found, count)


async def ensure_winnow_topics(settings: KafkaSettings) -> None:
    """Creates all of Winnow's topics under ``settings.topic_prefix`` that are missing.

    Raises:
        ConfigError: the connection settings are inconsistent.
        BrokerError: as :func:`ensure_topics`.
    """
    await ensure_topics(settings, settings.topics.all())


async def topic_partitions(settings: KafkaSettings, topic: str) -> list[TopicPartition]:
    """The partitions of ``topic``, in partition order; empty if the topic does not exist.

    Reads the metadata of *all* topics, so asking never makes an auto-creating
    broker (Tansu) create ``topic`` with its own partition count.

    Args:
        settings: the cluster.
        topic: the topic name.

    Returns:
        One ``TopicPartition`` per partition, sorted by partition number.

    Raises:
        ConfigError: the connection settings are inconsistent.
        BrokerError: the broker is unreachable or does not answer with metadata.
    """
    client = AIOKafkaClient(**client_kwargs(settings))
    try:
        await client.bootstrap()
        cluster = await client.fetch_all_metadata()
    except KafkaError as exc:
        raise BrokerError(f"cannot read metadata from {settings.bootstrap}: {exc!r}") from exc
    finally:
        await client.close()
    return [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or ())]


async def wait_for_broker(settings: KafkaSettings, timeout_s: float = 30) -> None:
    """Waits until the cluster answers, retrying with exponential backoff.

    Args:
        settings: the cluster to reach.
        timeout_s: how long to keep trying.

    Raises:
        ConfigError: the connection settings are inconsistent.
        BrokerError: no answer from ``settings.bootstrap`` within ``timeout_s``.
    """
    kwargs = client_kwargs(settings)
    deadline = time.monotonic() + timeout_s
    delay, attempt = 0.1, 0
    while True:
        attempt += 1
        client = AIOKafkaClient(**kwargs)
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                await client.bootstrap()
            return
        except (KafkaError, OSError, TimeoutError) as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerError(
                    f"Kafka at {settings.bootstrap} did not answer within {timeout_s:g} s "
                    f"({attempt} attempts; last error: {exc!r})"
                ) from exc
            log.info("Kafka at %s not reachable yet (%r); retrying", settings.bootstrap, exc)
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 2.0)
        finally:
            await client.close()


def _check_created(topic_errors: list[tuple], settings: KafkaSettings, partitions: int) -> None:
    # Entries are (topic, error_code) or, from v1 on, (topic, error_code, message).
    setting_of_error = {  # creation errors that a setting causes, and that setting
        InvalidReplicationFactorError.errno: (
            f"WINNOW_KAFKA_REPLICATION_FACTOR={settings.replication_factor}"
        ),
        InvalidPartitionsError.errno: f"WINNOW_KAFKA_PARTITIONS={partitions}",
    }
    failed, causes = [], set()
    for entry in topic_errors:
        topic, code = entry[0], entry[1]
        if code in (0, TopicAlreadyExistsError.errno):
            continue
        message = entry[2] if len(entry) > 2 and entry[2] else for_code(code).__name__
        failed.append(f"{topic}: {message} (error {code})")
        if code in setting_of_error:
            causes.add(setting_of_error[code])
    if failed:
        hint = f"; check {', '.join(sorted(causes))}" if causes else ""
        raise BrokerError(
            f"{settings.bootstrap} refused to create topics: {'; '.join(failed)}{hint}"
        )


async def _wait_for_topics(settings: KafkaSettings, names: list[str]) -> ClusterMetadata:
    """Metadata in which every topic in ``names`` exists; retried because it can lag.

    Asks for *all* topics: asking for named ones would make auto-creating
    brokers create them, which would hide a failed creation.
    """
    client = AIOKafkaClient(**client_kwargs(settings))
    deadline = time.monotonic() + VERIFY_TIMEOUT_S
    try:
        await client.bootstrap()
        while True:
            cluster = await client.fetch_all_metadata()
            missing = [n for n in names if not cluster.partitions_for_topic(n)]
            if not missing:
                return cluster
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"topics still missing on {settings.bootstrap} {VERIFY_TIMEOUT_S:g} s after "
                    f"creating them: {', '.join(missing)}"
                )
            await asyncio.sleep(0.1)
    except KafkaError as exc:
        raise BrokerError(f"cannot read metadata from {settings.bootstrap}: {exc!r}") from exc
    finally:
        await client.close()
