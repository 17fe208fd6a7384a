"""The chart and the code agree on settings: names, formats and which ones are secret.

Every ``WINNOW_*`` variable the chart gives a role is a field of that role's
settings classes; the role parses what the chart renders; every secret setting
(``SecretStr``) arrives by ``secretKeyRef`` and the schema keeps it out of the
ConfigMaps. A renamed or new setting fails here, not in a cluster.
"""

import os
from typing import Any

import pytest
from pydantic import AliasChoices, SecretStr
from pydantic_settings import BaseSettings

from infra.kafka.settings import KafkaSettings
from service.config import LabelAppSettings, Settings
from service.labeling.label_studio import LabelStudioSettings
from tests.deploy.chart_render import (
    CHART,
    VALUE_SETS,
    Obj,
    ci_values,
    config_of,
    env_names,
    helm_sdk,
    of_kind,
    pod_specs,
    render,
)
from trainer.config import TrainerSettings

helm = helm_sdk()

# The settings classes each container's command reads (winnow/cli.py).
ROLES: dict[str, tuple[type[BaseSettings], ...]] = {
    "scorer": (Settings,),
    "trainer": (TrainerSettings,),
    "label-app": (LabelAppSettings, KafkaSettings),
    "label-studio-bridge": (LabelStudioSettings, KafkaSettings),
}

COMMANDS = {
    "scorer": "serve",
    "trainer": "train",
    "label-app": "label-app",
    "label-studio-bridge": "label-studio-bridge",
}


def _fields(cls: type[BaseSettings]) -> dict[str, Any]:
    """Environment name -> field info of a settings class, nested settings included."""
    prefix = str(cls.model_config.get("env_prefix", "")).upper()
    found: dict[str, Any] = {}
    for name, field in cls.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
            found.update(_fields(annotation))  # read from its own prefix
            continue
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names = [c.upper() for c in alias.choices if isinstance(c, str)]
        elif isinstance(alias, str):
            names = [alias.upper()]
        else:
            names = [prefix + name.upper()]
        found.update({n: field for n in names if n.startswith("WINNOW_")})
    return found


def _role_fields(role: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for cls in ROLES[role]:
        fields.update(_fields(cls))
    return fields


def _secret_names(role: str) -> set[str]:
    return {
        name
        for name, field in _role_fields(role).items()
        if SecretStr in getattr(field.annotation, "__args__", (field.annotation,))
    }


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def rendered(chart: Any) -> dict[str, list[Obj]]:
    return {name: render(chart, ci_values(name)) for name in VALUE_SETS}


def _containers(objects: list[Obj]) -> list[Obj]:
    return [
        c
        for name, _, spec in pod_specs(objects)
        if not name.endswith("test-readyz")
        for c in spec["containers"]
    ]


@pytest.mark.parametrize("values", VALUE_SETS)
def test_every_variable_the_chart_sets_is_a_setting_of_its_role(
    rendered: dict[str, list[Obj]], values: str
) -> None:
    objects = rendered[values]
    containers = _containers(objects)
    assert {c["name"] for c in containers} <= set(ROLES)
    for container in containers:
        unknown = env_names(objects, container) - set(_role_fields(container["name"]))
        assert not unknown, f"{container['name']} gets variables no setting reads: {unknown}"


def _environment(objects: list[Obj], container: Obj) -> dict[str, str]:
    env = dict(config_of(objects, container))
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", f"from-{var['valueFrom']['secretKeyRef']['key']}")
    return env


def _settings_of(role: str, environment: dict[str, str], monkeypatch: Any) -> list[Any]:
    for name in [n for n in os.environ if n.upper().startswith("WINNOW_")]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return [cls() for cls in ROLES[role]]


@pytest.mark.parametrize("values", ["full", "sasl-ssl", "cpu-only"])
def test_each_role_parses_what_the_chart_renders(
    rendered: dict[str, list[Obj]], values: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered[values]
    chart_values = ci_values(values)
    for container in _containers(objects):
        role = container["name"]
        with monkeypatch.context() as patch:
            parsed = _settings_of(role, _environment(objects, container), patch)
        kafka = parsed[0].kafka if role in ("scorer", "trainer") else parsed[1]
        assert kafka.bootstrap == chart_values["kafka"]["bootstrap"], role
        if role == "scorer":
            (settings,) = parsed
            assert settings.http.host == "0.0.0.0"
            assert settings.scorer.follow_releases
        if role == "trainer":
            (settings,) = parsed
            assert settings.classes == chart_values["trainer"]["classes"]
            assert str(settings.data_dir) == "/data"
        if role == "label-app":
            ingress = chart_values.get("labelApp", {}).get("ingress", {})
            tls = ingress.get("enabled", False) and ingress.get("tls", {}).get("enabled", False)
            assert parsed[0].cookie_secure is tls


@pytest.mark.parametrize("role", list(ROLES))
def test_every_secret_setting_comes_from_a_secret(
    rendered: dict[str, list[Obj]], role: str
) -> None:
    # SASL on and secrets.existingSecret set: every secret a role reads should be wired.
    objects = rendered["full"]
    (container,) = [c for c in _containers(objects) if c["name"] == role]
    by_reference = {e["name"] for e in container.get("env", []) if "secretKeyRef" in str(e)}
    assert by_reference == _secret_names(role)


def test_the_schema_keeps_every_secret_out_of_the_config_maps(chart: Any) -> None:
    forbidden = set(chart.schema["definitions"]["settings"]["propertyNames"]["not"]["enum"])
    secrets = set().union(*(_secret_names(role) for role in ROLES))
    assert secrets <= forbidden


@pytest.mark.parametrize("values", ["full", "default"])
def test_every_container_runs_a_command_the_cli_has(
    rendered: dict[str, list[Obj]], values: str
) -> None:
    from winnow.cli import build_parser

    parser = build_parser()
    for name, _, spec in pod_specs(rendered[values]):
        for container in spec["containers"]:
            command = container["command"]
            if name.endswith("test-readyz"):
                assert command[0] == "python"
                continue
            assert command[0] == "winnow"
            assert parser.parse_args(command[1:]).command == COMMANDS[container["name"]]


def _service_link_names(service: Obj) -> set[str]:
    """The variables Kubernetes' service links would give every pod of the namespace."""
    prefix = service["metadata"]["name"].upper().replace("-", "_")
    names = {f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"}
    for port in service["spec"]["ports"]:
        names.add(f"{prefix}_SERVICE_PORT_{port['name'].upper()}")
        names |= {f"{prefix}_PORT_{port['port']}_TCP{s}" for s in ("", "_PROTO", "_PORT", "_ADDR")}
    return names


def test_service_links_are_off_because_they_would_collide_with_settings(chart: Any) -> None:
    # A release named "winnow" has the Services winnow-scorer and winnow-label-app; with
    # service links every pod would get WINNOW_LABEL_APP_PORT=tcp://10.0.0.7:8100.
    objects = render(chart, ci_values("full"), release="winnow")
    links = set().union(*(_service_link_names(s) for s in of_kind(objects, "Service")))
    settings = set().union(*(_role_fields(role) for role in ROLES))
    assert "WINNOW_LABEL_APP_PORT" in links & settings
    for name, _, spec in pod_specs(objects):
        assert spec["enableServiceLinks"] is False, name
