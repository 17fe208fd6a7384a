"""The embedded broker: starts, answers Kafka clients, stops, refuses a taken port."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from infra.kafka.admin import wait_for_broker
from infra.kafka.broker import EmbeddedBroker
from infra.kafka.settings import KafkaSettings
from service.errors import BrokerError, ConfigError


def _accepts(bootstrap: str) -> bool:
    host, _, port = bootstrap.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


async def test_starts_on_a_free_port_and_serves_kafka_clients() -> None:
    async with EmbeddedBroker(0) as broker:
        assert broker.port != 0
        assert broker.bootstrap == f"127.0.0.1:{broker.port}"
        assert broker.running
        await wait_for_broker(KafkaSettings(bootstrap=broker.bootstrap), timeout_s=5)
    assert not broker.running
    assert not _accepts(broker.bootstrap)


def test_stop_is_idempotent() -> None:
    broker = EmbeddedBroker(0)
    broker.stop()  # never started: nothing to do
    broker.start()
    bootstrap = broker.bootstrap
    assert _accepts(bootstrap)
    broker.stop()
    broker.stop()
    assert not broker.running
    assert not _accepts(bootstrap)


def test_a_port_in_use_is_a_clear_error(kafka_broker: EmbeddedBroker) -> None:
    with pytest.raises(ConfigError, match=rf"127\.0\.0\.1:{kafka_broker.port} is already in use"):
        EmbeddedBroker(kafka_broker.port).start()
    assert kafka_broker.running  # the broker already there is untouched


def test_a_port_held_by_another_program_is_a_clear_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError, match="already in use"):
            EmbeddedBroker(port).start()


async def test_wait_for_broker_names_the_address_it_could_not_reach() -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(BrokerError, match=rf"127\.0\.0\.1:{port} did not answer within 1 s"):
        await wait_for_broker(KafkaSettings(bootstrap=f"127.0.0.1:{port}"), timeout_s=1)


def test_run_broker_forever_prints_its_address_and_stops_on_sigterm() -> None:
    code = "import sys; from infra.kafka.broker import run_broker_forever as r; sys.exit(r(0))"
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("Kafka-compatible broker (Tansu, memory only) on 127.0.0.1:")
        bootstrap = line.split(" on ", 1)[1].split()[0]
        assert _accepts(bootstrap)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert not _accepts(bootstrap)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        if process.stderr is not None:
            process.stderr.close()
