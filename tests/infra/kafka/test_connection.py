"""client_kwargs: what aiokafka gets for each security protocol, and what is refused."""

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from infra.kafka.connection import client_kwargs
from infra.kafka.settings import KafkaSettings
from service.errors import ConfigError


def _settings(**fields: Any) -> KafkaSettings:
    """Settings from the arguments only, never from WINNOW_KAFKA_* in the environment."""
    base: dict[str, Any] = {
        "bootstrap": "kafka-1:9092,kafka-2:9092",
        "security_protocol": "PLAINTEXT",
        "sasl_mechanism": None,
        "sasl_username": None,
        "sasl_password": None,
        "ssl_cafile": None,
        "ssl_certfile": None,
        "ssl_keyfile": None,
        "client_id": "winnow-test",
    }
    return KafkaSettings(**{**base, **fields})


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and its key (the certificate doubles as the CA)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_plaintext_passes_only_address_client_id_and_protocol() -> None:
    assert client_kwargs(_settings(bootstrap=" kafka-1:9092 , kafka-2:9092 ")) == {
        "bootstrap_servers": "kafka-1:9092,kafka-2:9092",
        "client_id": "winnow-test",
        "security_protocol": "PLAINTEXT",
    }


def test_sasl_ssl_unwraps_the_password_and_builds_a_verifying_tls_context(
    tls_files: tuple[Path, Path],
) -> None:
    cert, key = tls_files
    kwargs = client_kwargs(
        _settings(
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="scorer",
            sasl_password=SecretStr("s3cret"),
            ssl_cafile=cert,
            ssl_certfile=cert,
            ssl_keyfile=key,
        )
    )
    context = kwargs.pop("ssl_context")
    assert kwargs == {
        "bootstrap_servers": "kafka-1:9092,kafka-2:9092",
        "client_id": "winnow-test",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "scorer",
        "sasl_plain_password": "s3cret",
    }
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "localhost"),),)]


def test_ssl_without_files_uses_the_system_trust_store() -> None:
    kwargs = client_kwargs(_settings(security_protocol="SSL"))
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    assert "sasl_mechanism" not in kwargs


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"bootstrap": None}, "no Kafka bootstrap address"),
        ({"bootstrap": " , "}, "no Kafka bootstrap address"),
        ({"bootstrap": "kafka-1"}, "bad Kafka bootstrap address kafka-1"),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u"},
            "SASL_SSL needs WINNOW_KAFKA_SASL_PASSWORD",
        ),
        (
            {"security_protocol": "SASL_PLAINTEXT"},
            "needs WINNOW_KAFKA_SASL_MECHANISM, WINNOW_KAFKA_SASL_USERNAME, "
            "WINNOW_KAFKA_SASL_PASSWORD",
        ),
        ({"sasl_username": "u"}, "SASL credentials are set but .* is PLAINTEXT"),
        ({"ssl_cafile": Path("/ca.pem")}, "TLS files are set but .* is PLAINTEXT"),
        (
            {"security_protocol": "SSL", "ssl_certfile": Path("/cert.pem")},
            "needs both WINNOW_KAFKA_SSL_CERTFILE and WINNOW_KAFKA_SSL_KEYFILE",
        ),
        (
            {"security_protocol": "SSL", "ssl_cafile": Path("/no/such/ca.pem")},
            "TLS file not found: /no/such/ca.pem",
        ),
    ],
)
def test_inconsistent_settings_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        client_kwargs(_settings(**fields))


def test_a_file_that_is_not_a_certificate_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot build the TLS context"):
        client_kwargs(_settings(security_protocol="SSL", ssl_cafile=bogus))
