"""Connection settings shared by every aiokafka client Winnow builds.

``client_kwargs`` turns :class:`~infra.kafka.settings.KafkaSettings` into the keyword
arguments that ``AIOKafkaProducer``, ``AIOKafkaConsumer``,
``AIOKafkaAdminClient`` and ``AIOKafkaClient`` all accept, and refuses settings
that could never connect, so the mistake surfaces at startup with a message
instead of as a timeout later.
"""

import ssl
from pathlib import Path
from typing import Any

from aiokafka.helpers import create_ssl_context

from infra.errors import ConfigError
from infra.kafka.settings import KafkaSettings

_SASL = ("SASL_PLAINTEXT", "SASL_SSL")
_SSL = ("SSL", "SASL_SSL")


def client_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments common to all aiokafka clients.

    Args:
        settings: where the cluster is and how to authenticate.

    Returns:
        ``bootstrap_servers``, ``client_id`` and ``security_protocol``; with SASL
        also ``sasl_mechanism`` and ``sasl_plain_username``/``_password`` (the
        secret unwrapped); with SSL an ``ssl_context`` built from the
        configured CA, certificate and key files.

    Raises:
        ConfigError: no bootstrap address, SASL without mechanism, username or
            password, TLS files given to a plaintext connection, a client
            certificate without its key, or a TLS file that does not exist.
    """
    bootstrap = _bootstrap_servers(settings)
    protocol = settings.security_protocol
    kwargs: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "client_id": settings.client_id,
        "security_protocol": protocol,
    }
    if protocol in _SASL:
        kwargs.update(_sasl_kwargs(settings))
    elif settings.sasl_mechanism or settings.sasl_username or settings.sasl_password:
        raise ConfigError(
            f"SASL credentials are set but WINNOW_KAFKA_SECURITY_PROTOCOL is {protocol}; "
            "use SASL_PLAINTEXT or SASL_SSL, or remove the credentials"
        )
    if protocol in _SSL:
        kwargs["ssl_context"] = _ssl_context(settings)
    elif settings.ssl_cafile or settings.ssl_certfile or settings.ssl_keyfile:
        raise ConfigError(
            f"TLS files are set but WINNOW_KAFKA_SECURITY_PROTOCOL is {protocol}; "
            "use SSL or SASL_SSL, or remove WINNOW_KAFKA_SSL_*"
        )
    return kwargs


def _bootstrap_servers(settings: KafkaSettings) -> str:
    servers = [s.strip() for s in (settings.bootstrap or "").split(",") if s.strip()]
    if not servers:
        raise ConfigError(
            "no Kafka bootstrap address: set WINNOW_KAFKA_BOOTSTRAP=host:port[,host:port] "
            "(or start the embedded broker)"
        )
    bad = [s for s in servers if not _looks_like_address(s)]
    if bad:
        raise ConfigError(f"bad Kafka bootstrap address {', '.join(bad)}: expected host:port")
    return ",".join(servers)


def _looks_like_address(server: str) -> bool:
    host, sep, port = server.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _sasl_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    password = settings.sasl_password.get_secret_value() if settings.sasl_password else ""
    missing = [
        name
        for name, value in (
            ("WINNOW_KAFKA_SASL_MECHANISM", settings.sasl_mechanism),
            ("WINNOW_KAFKA_SASL_USERNAME", settings.sasl_username),
            ("WINNOW_KAFKA_SASL_PASSWORD", password),
        )
        if not value
    ]
    if missing:
        raise ConfigError(
            f"security protocol {settings.security_protocol} needs {', '.join(missing)}"
        )
    return {
        "sasl_mechanism": settings.sasl_mechanism,
        "sasl_plain_username": settings.sasl_username,
        "sasl_plain_password": password,
    }


def _ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    if (settings.ssl_certfile is None) != (settings.ssl_keyfile is None):
        raise ConfigError(
            "a TLS client certificate needs both WINNOW_KAFKA_SSL_CERTFILE and "
            "WINNOW_KAFKA_SSL_KEYFILE"
        )
    for path in (settings.ssl_cafile, settings.ssl_certfile, settings.ssl_keyfile):
        if path is not None and not path.is_file():
            raise ConfigError(f"TLS file not found: {path}")
    try:
        return create_ssl_context(
            cafile=_str(settings.ssl_cafile),
            certfile=_str(settings.ssl_certfile),
            keyfile=_str(settings.ssl_keyfile),
        )
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"cannot build the TLS context from WINNOW_KAFKA_SSL_*: {exc}") from exc


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
