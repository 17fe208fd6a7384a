"""Broker outages: fatal vs transient errors, the watch's log lines, stopping clients in a cut."""

import asyncio
import gc
import logging
import time

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient

from infra.kafka.admin import ensure_topics
from infra.kafka.closing import drain, stop_client
from infra.kafka.connection import client_kwargs
from infra.kafka.consumer import create_consumer
from infra.kafka.delivery import is_retriable
from infra.kafka.offsets import OffsetTracker
from infra.kafka.outage import CONNECTION_LEFTOVERS, BrokerWatch, describe_fatal, is_fatal
from tests.kafka_helpers import produce
from tests.kafka_proxy import FaultProxy

FATAL = [
    kafka_errors.SaslAuthenticationFailed(),
    kafka_errors.AuthenticationFailedError(),
    kafka_errors.UnsupportedSaslMechanismError(),
    kafka_errors.TopicAuthorizationFailedError(),
    kafka_errors.GroupAuthorizationFailedError(),
    kafka_errors.ClusterAuthorizationFailedError(),
    kafka_errors.UnsupportedVersionError(),
    kafka_errors.InvalidTopicError(),
]
TRANSIENT = [
    kafka_errors.KafkaConnectionError(),
    kafka_errors.NodeNotReadyError(),
    kafka_errors.KafkaTimeoutError(),
    kafka_errors.RequestTimedOutError(),
    kafka_errors.NotLeaderForPartitionError(),
    kafka_errors.UnknownTopicOrPartitionError(),
    kafka_errors.GroupCoordinatorNotAvailableError(),
    kafka_errors.CommitFailedError(),
    kafka_errors.NoBrokersAvailable(),
    TimeoutError(),
    ConnectionResetError(),
]


@pytest.mark.parametrize("error", FATAL, ids=lambda e: type(e).__name__)
def test_refusals_no_retry_can_fix_are_fatal(error: Exception) -> None:
    """Catches a role that retries refused credentials or ACLs forever instead of exiting."""
    assert is_fatal(error)
    assert not is_retriable(error)  # the delivery loop does not resend them either


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__)
def test_outage_errors_are_not_fatal(error: Exception) -> None:
    """Catches a role that exits (and is restarted in a loop) on a mere outage or rebalance."""
    assert not is_fatal(error)


def test_a_fatal_cause_makes_the_error_fatal() -> None:
    """Catches a refusal wrapped by our own code (raise ... from error) slipping through."""
    wrapped = RuntimeError("starting the consumer failed")
    wrapped.__cause__ = kafka_errors.TopicAuthorizationFailedError()
    assert is_fatal(wrapped)


def test_the_fatal_message_is_one_line_naming_the_error() -> None:
    """Catches an exit message that hides what Kafka refused, or spreads over lines."""
    line = describe_fatal("scorer", kafka_errors.SaslAuthenticationFailed("bad password"))
    assert "\n" not in line
    assert line.startswith("scorer: ")
    assert "SaslAuthenticationFailed" in line and "bad password" in line


async def _until(condition, within: float, step: float = 0.05) -> None:
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - polls a flag another task sets
            await asyncio.sleep(step)


def _dropped_future(error: BaseException) -> None:
    """A future that fails with ``error`` and is collected unread, as a broken
    connection's closed-future is: asyncio logs it when it is collected."""
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
        future.set_exception(error)
        del future
        gc.collect()
    finally:
        loop.close()


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError(104, "Connection reset by peer"),
        BrokenPipeError(32, "Broken pipe"),
        kafka_errors.KafkaConnectionError("Connection at localhost:9092 closed"),
    ],
)
def test_a_broken_connections_unread_error_is_not_an_error_line(
    error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    """The failure it catches: a trainer stopped while the broker was cut off ended its log
    with asyncio's "Future exception was never retrieved" and a ConnectionResetError
    traceback, logged at ERROR when the connection's closed-future was collected after the
    stop. Other errors, a full disk's OSError among them, stay in the log."""
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addFilter(CONNECTION_LEFTOVERS)
    try:
        with caplog.at_level(logging.DEBUG):
            _dropped_future(error)
            _dropped_future(ValueError("a bug"))
            _dropped_future(OSError(28, "No space left on device"))
    finally:
        asyncio_log.removeFilter(CONNECTION_LEFTOVERS)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [type(r.exc_info[1]) for r in errors] == [ValueError, OSError]  # type: ignore[index]
    assert all("never retrieved" in r.getMessage() for r in errors)
    assert any("nobody read" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.DEBUG):  # without the filter asyncio logs it (the test can fail)
        _dropped_future(error)
    unread = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert [r.levelno for r in unread] == [logging.ERROR]


async def test_an_outage_is_logged_once_then_summarised_then_closed(
    fault_proxy: FaultProxy, proxied_kafka_settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Catches per-retry client lines during an outage, a watch that never notices it, or
    one that does not say when the broker is back."""
    caplog.set_level(logging.INFO)
    client_log = logging.getLogger("aiokafka")
    async with BrokerWatch(
        proxied_kafka_settings, "test-role", probe_interval_s=0.1, summary_interval_s=1.0
    ) as watch:
        await _until(lambda: watch.reachable, 5)
        fault_proxy.cut()
        await _until(lambda: not watch.reachable, 10)
        for _ in range(300):  # what aiokafka logs while it retries
            client_log.error("Unable connect to node with id %s: %s", 0, "Connection closed")
        logging.getLogger("infra.kafka.offsets").warning("offset commit failed: %r", "x")
        await asyncio.sleep(2.5)
        fault_proxy.heal()
        await _until(lambda: watch.reachable, 10)
        await asyncio.sleep(1.5)  # a summary interval after the recovery: nothing more to say
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    text = [r.getMessage() for r in lines]
    assert not [r for r in lines if r.name.startswith("aiokafka")], text
    assert not [r for r in lines if r.name == "infra.kafka.offsets"], text
    assert sum("unreachable since" in t for t in text) == 1, text
    assert 1 <= sum("unreachable for" in t for t in text) <= 4, text
    back = [t for t in text if "reachable again after" in t]
    assert len(back) == 1 and fault_proxy.address in back[0], text
    assert any("client retries" in t and int(t.split("(")[-1].split()[0]) >= 301 for t in back)
    assert not [t for t in text if "collapsed" in t], text


async def test_client_errors_while_the_broker_answers_are_summarised(
    proxied_kafka_settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Catches connection errors hidden for good when the probe still gets through (a lost
    partition leader on another broker): they come back as one summary per interval."""
    caplog.set_level(logging.INFO)
    client_log = logging.getLogger("aiokafka.consumer.fetcher")
    async with BrokerWatch(
        proxied_kafka_settings, "test-role", probe_interval_s=0.1, summary_interval_s=1.0
    ) as watch:
        await _until(lambda: watch.reachable, 5)
        await asyncio.sleep(1.1)
        for _ in range(40):
            client_log.error("Failed fetch messages from %s: %s", 2, "NodeNotReadyError")
        await asyncio.sleep(1.5)
    text = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    summaries = [t for t in text if "collapsed" in t]
    assert len(summaries) == 1 and summaries[0].startswith("test-role: 40 Kafka client errors")
    assert "NodeNotReadyError" in summaries[0]
    assert not [r for r in caplog.records if r.name == client_log.name]


async def test_other_client_warnings_pass_once_per_interval(
    proxied_kafka_settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Catches a filter that hides every client warning (a real problem would go unseen) or
    lets a repeated one flood the log."""
    caplog.set_level(logging.INFO)
    client_log = logging.getLogger("aiokafka.consumer.group_coordinator")
    async with BrokerWatch(proxied_kafka_settings, "test-role", summary_interval_s=60):
        for _ in range(50):
            client_log.warning("OffsetCommit failed for group %s: %s", "g", "RebalanceInProgress")
    passed = [r for r in caplog.records if r.name == client_log.name]
    assert len(passed) == 1


async def test_stop_client_ends_a_consumer_cut_off_mid_fetch(
    fault_proxy: FaultProxy, proxied_kafka_settings
) -> None:
    """Catches aiokafka's consumer.stop() leaking a CancelledError (the "Application shutdown
    failed" traceback) or hanging when the broker went away during a fetch."""
    topic = proxied_kafka_settings.topics.frames
    await ensure_topics(proxied_kafka_settings, [topic])
    consumer = create_consumer(proxied_kafka_settings, topic, group_id=None)
    await consumer.start()
    await consumer.getmany(timeout_ms=300)
    fault_proxy.cut()
    await asyncio.sleep(1.5)  # fetches fail and back off
    started = time.monotonic()
    await stop_client(consumer, "test consumer", timeout_s=5)
    assert time.monotonic() - started < 7


async def test_the_stop_commit_names_what_stays_uncommitted(
    fault_proxy: FaultProxy, proxied_kafka_settings, group_id, caplog: pytest.LogCaptureFixture
) -> None:
    """Catches a stop during an outage that hangs on its commit, or ends without saying which
    partitions the next owner will read again."""
    topic = proxied_kafka_settings.topics.frames
    await ensure_topics(proxied_kafka_settings, [topic])
    await produce(proxied_kafka_settings, topic, [(b"k", b"v%d" % i, []) for i in range(6)])
    consumer: AIOKafkaConsumer = create_consumer(proxied_kafka_settings, topic, group_id=group_id)
    await consumer.start()
    tracker = OffsetTracker("test")
    try:
        seen = 0
        async with asyncio.timeout(30):
            while seen < 6:
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    tracker.consumed_many((tp, r.offset) for r in records)
                    tracker.done_many((tp, r.offset) for r in records)
                    seen += len(records)
        fault_proxy.cut()
        await asyncio.sleep(0.5)
        started = time.monotonic()
        assert not await tracker.commit_before_stop(consumer, 1.0, "they will be read again")
        assert time.monotonic() - started < 3
    finally:
        fault_proxy.heal()
        await stop_client(consumer, "test consumer")
    lines = [r.getMessage() for r in caplog.records if "stopping with the broker" in r.message]
    assert len(lines) == 1
    partitions = {tp.partition for tp in tracker.behind()}
    assert partitions and all(f"{topic}:{p}" in lines[0] for p in partitions)
    count = "1 partition's offset" if len(partitions) == 1 else f"{len(partitions)} partitions'"
    assert f"{count}" in lines[0] and "not committed" in lines[0]


async def test_drain_stops_waiting_once_the_broker_is_away() -> None:
    """Catches a stop that waits out the whole drain timeout for records that cannot go."""
    task = asyncio.create_task(asyncio.sleep(30))
    reachable = [True]
    asyncio.get_running_loop().call_later(0.3, reachable.clear)
    started = time.monotonic()
    pending = await drain([task], 20, lambda: bool(reachable))
    assert pending == {task} and time.monotonic() - started < 2
    task.cancel()


def test_behind_lists_partitions_consumed_past_their_commit() -> None:
    """Catches a stop line that counts partitions whose progress is committed."""
    tracker = OffsetTracker()
    a, b = TopicPartition("t", 0), TopicPartition("t", 1)
    tracker.consumed_many([(a, 0), (a, 1), (b, 0)])
    tracker.done_many([(a, 0), (a, 1), (b, 0)])
    tracker.committed({a: 2})
    assert tracker.behind() == [b]


async def test_drain_does_not_wait_when_a_task_has_already_failed() -> None:
    """Catches a stop that waits the whole drain for stages a crashed one left blocked."""

    async def crash() -> None:
        raise RuntimeError("stage bug")

    crashed = asyncio.create_task(crash())
    blocked = asyncio.create_task(asyncio.sleep(30))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    assert await drain([crashed, blocked], 20, lambda: True) == {blocked}
    assert time.monotonic() - started < 1
    blocked.cancel()


async def test_the_broker_advertises_the_proxy_so_every_connection_can_be_cut(
    fault_proxy: FaultProxy, proxied_kafka_settings
) -> None:
    """Catches a fault proxy that only the bootstrap connection goes through: clients would
    reach the broker's advertised address directly and a cut would cut nothing."""
    admin = AIOKafkaAdminClient(**client_kwargs(proxied_kafka_settings))
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    assert {f"{b['host']}:{b['port']}" for b in cluster["brokers"]} == {fault_proxy.address}


async def _consumed(
    settings, topic: str, group_id: str, prefix: bytes, count: int
) -> tuple[AIOKafkaConsumer, list]:
    """A started consumer that has read ``count`` new records, and their (partition, offset)."""
    await ensure_topics(settings, [topic])
    await produce(settings, topic, [(b"k", prefix + b"%d" % i, []) for i in range(count)])
    consumer: AIOKafkaConsumer = create_consumer(settings, topic, group_id=group_id)
    await consumer.start()
    consumed: list = []
    try:
        async with asyncio.timeout(30):
            while len(consumed) < count:
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    consumed += [(tp, r.offset) for r in records]
    except BaseException:
        await stop_client(consumer, "test consumer")
        raise
    return consumer, consumed


async def test_the_stop_commit_names_records_still_in_flight(
    proxied_kafka_settings, group_id, caplog: pytest.LogCaptureFixture
) -> None:
    """Catches a stop that commits what was done and says nothing of the records consumed
    and not yet done (a scorer cut off mid-delivery): their next owner redoes them, and the
    line says which partitions."""
    topic = proxied_kafka_settings.topics.frames
    consumer, consumed = await _consumed(proxied_kafka_settings, topic, group_id, b"v", 6)
    tracker = OffsetTracker("test")
    try:
        tracker.consumed_many(consumed)
        tracker.done_many(consumed[:2])
        assert await tracker.commit(consumer)  # the done prefix, committed before the stop
        assert not await tracker.commit_before_stop(consumer, 5.0, "they will be read again")
    finally:
        await stop_client(consumer, "test consumer")
    lines = [r.getMessage() for r in caplog.records if "stopping with" in r.message]
    assert len(lines) == 1 and "records in flight" in lines[0], lines
    assert f"{topic}:{consumed[2][0].partition}" in lines[0]
    assert "they will be read again by the next owner" in lines[0]


async def test_a_stop_with_everything_done_commits_and_says_nothing(
    proxied_kafka_settings, group_id, caplog: pytest.LogCaptureFixture
) -> None:
    topic = proxied_kafka_settings.topics.frames
    consumer, consumed = await _consumed(proxied_kafka_settings, topic, group_id, b"w", 3)
    tracker = OffsetTracker("test")
    try:
        tracker.consumed_many(consumed)
        tracker.done_many(consumed)
        assert await tracker.commit_before_stop(consumer, 5.0, "they will be read again")
    finally:
        await stop_client(consumer, "test consumer")
    assert not [r for r in caplog.records if "stopping with" in r.message]
