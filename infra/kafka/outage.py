"""Broker outages: notice them, log them once and then at a steady pace, and tell fatal errors.

aiokafka retries a lost broker on its own, and logs every failed attempt at
ERROR: thousands of lines a minute that bury whatever else happened. Each role
runs one :class:`BrokerWatch`. It probes the bootstrap servers every second
(a Kafka ``ApiVersions`` request, over TLS when configured), and while they do
not answer it logs one WARNING when the outage starts, a summary every
``summary_interval_s`` and one line when the broker answers again. Its
:class:`OutageLogFilter`, on aiokafka's loggers and on Winnow's own retry
loggers, turns their per-attempt lines into the retry count of that summary.
Readiness reads :attr:`BrokerWatch.reachable`. :class:`ConnectionLeftoverFilter` keeps
the errors that broken connections leave on futures nobody reads out of the log.

An error no retry can cure (authentication or authorization refused, a
protocol the broker does not speak) is *fatal*: :func:`is_fatal` says which,
and :func:`describe_fatal` gives the one line a role exits with, so the
orchestrator restarts it after someone fixed the cause.
"""

import asyncio
import logging
import ssl
import struct
import time
from datetime import UTC, datetime

from aiokafka import errors as kafka_errors

from infra.component import Component
from infra.kafka.connection import client_kwargs
from infra.kafka.settings import KafkaSettings

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 2.0
SUMMARY_INTERVAL_S = 20.0
DOWN_AFTER_FAILED_PROBES = 2
"""Consecutive failed probes that make an outage (one lost probe is no outage)."""

CLIENT_LOGGERS = (
    "aiokafka",
    "aiokafka.client",
    "aiokafka.conn",
    "aiokafka.cluster",
    "aiokafka.consumer.consumer",
    "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
    "aiokafka.consumer.subscription_state",
    "aiokafka.producer.producer",
    "aiokafka.producer.sender",
    "aiokafka.producer.message_accumulator",
    "aiokafka.admin.client",
)
"""aiokafka's loggers: each logs its own retries (a filter on a parent does not see them).
Those of any other aiokafka module imported when a watch starts are filtered too."""

RETRY_LOGGERS = ("infra.kafka.delivery", "infra.kafka.offsets")
"""Winnow's own per-attempt lines (resends, failed commits): collapsed only during an outage."""

_FATAL: tuple[type[BaseException], ...] = (
    kafka_errors.AuthenticationFailedError,
    kafka_errors.SaslAuthenticationFailed,
    kafka_errors.UnsupportedSaslMechanismError,
    kafka_errors.IllegalSaslStateError,
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.GroupAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.TransactionalIdAuthorizationFailed,
    kafka_errors.UnsupportedVersionError,
    kafka_errors.InvalidTopicError,
    kafka_errors.InvalidGroupIdError,
    kafka_errors.InvalidSessionTimeoutError,
    kafka_errors.InvalidReplicationFactorError,
    ssl.SSLError,
)
_CONNECTION_WORDS = (
    "connect",
    "not ready",
    "NodeNotReady",
    "NoBrokersAvailable",
    "metadata",
    "coordinator",
    "Heartbeat",
    "RequestTimedOut",
    "timed out",
)


def is_fatal(error: BaseException) -> bool:
    """Whether retrying cannot help: credentials, permissions, protocol or a bad name.

    A broker that cannot be reached, a timeout, a leader moving or a group
    rebalancing are transient (aiokafka marks most ``retriable``); a topic the
    broker does not know is transient too (it may be being created). What the
    broker refuses for who we are, or cannot parse, stays refused.
    """
    if isinstance(error, _FATAL):
        return True
    cause = error.__cause__
    return cause is not None and cause is not error and is_fatal(cause)


def describe_fatal(role: str, error: BaseException) -> str:
    """The one line a role exits with on a fatal Kafka error."""
    name = type(error).__name__
    detail = str(error) or getattr(error, "description", "") or name
    return (
        f"{role}: Kafka refused a request that no retry can fix ({name}: {detail}); "
        "stopping so the orchestrator restarts the process once the cause is fixed "
        "(credentials, ACLs, the topic's name or the broker's version)"
    )


class OutageLogFilter(logging.Filter):
    """Collapses the per-attempt lines of Kafka clients into the watch's summaries.

    On aiokafka's loggers a connection error (connect failed, node not ready,
    metadata or coordinator lost, a timeout) is never passed: it is counted as
    a retry and makes the watch probe at once; any other warning passes once
    per template and summary interval. On Winnow's retry loggers every line
    passes except during an outage. Records below WARNING always pass.
    """

    def __init__(self, watch: "BrokerWatch") -> None:
        super().__init__("winnow-outage")
        self._watch = watch
        self._passed: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        watch = self._watch
        client = record.name.startswith("aiokafka")
        if not watch.reachable:
            watch.count_retry(record)
            return False
        if not client:
            return True
        if _connection_noise(record):
            watch.count_retry(record)
            watch.probe_soon()
            return False
        key = (record.name, str(record.msg))
        now = time.monotonic()
        if now - self._passed.get(key, -1e9) < watch.summary_interval_s:
            watch.count_retry(record)
            return False
        self._passed[key] = now
        return True


def _connection_noise(record: logging.LogRecord) -> bool:
    try:
        text = record.getMessage()
    except Exception:  # a malformed record: judge by its template
        text = str(record.msg)
    return any(word.lower() in text.lower() for word in _CONNECTION_WORDS)


class ConnectionLeftoverFilter(logging.Filter):
    """Drops asyncio's "exception was never retrieved" for a connection error.

    A connection that breaks (the broker cut off, a reset) leaves its error on futures
    nobody waits for any more: the stream's closed-future, a request's. When they are
    collected, asyncio logs each at ERROR with a traceback, often after the role has
    stopped, so a clean stop during an outage ends in a traceback. A connection's own
    errors (``ConnectionError``: reset, refused, aborted, a broken pipe; ``EOFError``;
    aiokafka's ``KafkaConnectionError``) are logged at DEBUG instead. Any other error,
    another ``OSError`` (a full disk) included, still reaches the log as asyncio writes it.
    """

    def __init__(self) -> None:
        super().__init__("winnow-connection-leftovers")

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, ConnectionError | EOFError | kafka_errors.KafkaConnectionError):
            return True
        if "exception was never retrieved" not in str(record.msg):
            return True
        log.debug("a closed connection's error that nobody read: %r", error)
        return False


CONNECTION_LEFTOVERS = ConnectionLeftoverFilter()
"""On the ``asyncio`` logger from a watch's start for the process's life: the leftovers
show when they are collected, which may be after every component has stopped."""


class BrokerWatch(Component):
    """Probes the bootstrap servers; logs an outage once, then a summary, then the recovery.

    Use as ``async with BrokerWatch(kafka, "scorer") as broker:`` and read
    :attr:`reachable`. Started first and stopped last, it also covers the
    other components' stops.

    Args:
        kafka: the connection settings (address, TLS).
        role: names the process in log lines (``scorer``, ``trainer``, ``label-app``).
        probe_interval_s: time between probes.
        summary_interval_s: time between summaries while the broker is away.
        down_after: consecutive failed probes that make an outage.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        role: str,
        *,
        probe_interval_s: float = PROBE_INTERVAL_S,
        summary_interval_s: float = SUMMARY_INTERVAL_S,
        down_after: int = DOWN_AFTER_FAILED_PROBES,
    ) -> None:
        super().__init__()
        options = client_kwargs(kafka)
        self.role = role
        self.bootstrap = options["bootstrap_servers"]
        self.summary_interval_s = summary_interval_s
        self._servers = [_split(s) for s in self.bootstrap.split(",")]
        self._ssl: ssl.SSLContext | None = options.get("ssl_context")
        self._probe_interval_s = probe_interval_s
        self._down_after = down_after
        self._filter = OutageLogFilter(self)
        known = logging.root.manager.loggerDict  # every aiokafka module imported so far
        aiokafka_loggers = {name for name in known if name.startswith("aiokafka")}
        self._filtered = sorted({*CLIENT_LOGGERS, *aiokafka_loggers, *RETRY_LOGGERS})
        self._wake = asyncio.Event()
        self._failed_probes = 0
        self._down_since: float | None = None  # monotonic
        self._down_at: datetime | None = None
        self._last_summary = 0.0
        self._retries = 0
        self._last_error = ""
        self.outages = 0

    @property
    def reachable(self) -> bool:
        """False from the second failed probe until one succeeds again."""
        return self._down_since is None

    @property
    def down_for_s(self) -> float:
        """Seconds the broker has been unreachable; 0 while it answers."""
        return 0.0 if self._down_since is None else time.monotonic() - self._down_since

    def count_retry(self, record: logging.LogRecord) -> None:
        """A client line collapsed into the summary."""
        self._retries += 1
        try:
            self._last_error = record.getMessage()[:300]
        except Exception:
            self._last_error = str(record.msg)[:300]

    def probe_soon(self) -> None:
        """Probes now rather than at the next tick (a client just lost a connection)."""
        self._wake.set()

    async def _start(self) -> None:
        for name in self._filtered:
            logging.getLogger(name).addFilter(self._filter)
        logging.getLogger("asyncio").addFilter(CONNECTION_LEFTOVERS)  # once; never removed
        self.supervise(self._run(), name=f"{self.role}-broker-watch")

    async def _stop(self) -> None:
        await self._cancel_supervised()
        for name in self._filtered:
            logging.getLogger(name).removeFilter(self._filter)

    async def _run(self) -> None:
        while True:
            answered, why = await self._probe()
            self._observe(answered, why)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._probe_interval_s)
            except TimeoutError:
                pass

    def _observe(self, answered: bool, why: str) -> None:
        now = time.monotonic()
        if answered:
            self._failed_probes = 0
            if self._down_since is not None:
                log.warning(
                    "%s: Kafka broker %s reachable again after %.0f s (%d client retries)",
                    self.role,
                    self.bootstrap,
                    now - self._down_since,
                    self._retries,
                )
                self._down_since = self._down_at = None
                self._retries, self._last_summary = 0, now  # counted in the line above
                return
            if self._retries and now - self._last_summary >= self.summary_interval_s:
                log.warning(
                    "%s: %d Kafka client errors collapsed in the last %.0f s while %s answers; "
                    "last: %s",
                    self.role,
                    self._retries,
                    now - self._last_summary if self._last_summary else self.summary_interval_s,
                    self.bootstrap,
                    self._last_error,
                )
            if now - self._last_summary >= self.summary_interval_s:
                self._retries, self._last_summary = 0, now
            return
        self._failed_probes += 1
        if self._down_since is None and self._failed_probes >= self._down_after:
            self.outages += 1
            self._down_since = now - self._probe_interval_s * (self._failed_probes - 1)
            self._down_at = datetime.now(UTC)
            self._last_summary = now
            log.warning(
                "%s: Kafka broker %s unreachable since %s UTC (%s); retrying, "
                "a summary follows every %.0f s",
                self.role,
                self.bootstrap,
                self._down_at.strftime("%H:%M:%S"),
                why,
                self.summary_interval_s,
            )
        elif self._down_since is not None and now - self._last_summary >= self.summary_interval_s:
            self._last_summary = now
            log.warning(
                "%s: Kafka broker %s unreachable for %.0f s; %d client retries so far",
                self.role,
                self.bootstrap,
                now - self._down_since,
                self._retries,
            )

    async def _probe(self) -> tuple[bool, str]:
        """Whether any bootstrap server answers ``ApiVersions``; else why the last did not."""
        why = "no answer"
        for host, port in self._servers:
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_S):
                    if await _answers(host, port, self._ssl):
                        return True, ""
                why = "an unexpected answer"
            except TimeoutError:
                why = f"no answer within {PROBE_TIMEOUT_S:.0f} s"
            except OSError as error:
                why = error.strerror or type(error).__name__
        return False, why


_CORRELATION_ID = 0x57494F


async def _answers(host: str, port: int, context: ssl.SSLContext | None) -> bool:
    """Whether ``host:port`` answers a Kafka ApiVersions (v0) request (no SASL needed)."""
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    try:
        client_id = b"winnow-watch"
        body = struct.pack(">hhih", 18, 0, _CORRELATION_ID, len(client_id)) + client_id
        writer.write(struct.pack(">i", len(body)) + body)
        await writer.drain()
        header = await reader.readexactly(10)
    except asyncio.IncompleteReadError as error:
        raise ConnectionResetError("the connection closed before an answer") from error
    finally:
        writer.close()
    _, got_id, code = struct.unpack(">iih", header)
    return bool(got_id == _CORRELATION_ID and code == 0)


def _split(server: str) -> tuple[str, int]:
    host, _, port = server.strip().rpartition(":")
    return host, int(port)
