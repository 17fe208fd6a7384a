"""Renders helm/winnow offline (helm-python-sdk) and looks into what it renders.

Shared by the chart's tests (``test_chart*.py``). Rendering needs the Helm SDK's
native library; the tests skip, saying why, where it cannot be imported.
"""

import copy
import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "winnow"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
VALUE_SETS = [path.name.removesuffix("-values.yaml") for path in CI_VALUES]
RELEASE = "vision"
NAMESPACE = "winnow"
KUBE_VERSION = "1.30.0"
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
Obj = dict[str, Any]


def helm_sdk() -> ModuleType:
    """``helm_python``, or a skip of the calling test module that says why it cannot run."""
    try:
        return importlib.import_module("helm_python")
    except ImportError as error:
        reason = f"helm-python-sdk is not installed ({error}): the chart is not tested"
    except Exception as error:  # HelmLibraryError: its native library does not load here
        reason = (
            f"helm-python-sdk cannot load its native library ({error}): the chart is not tested"
        )
    pytest.skip(reason, allow_module_level=True)


def ci_values(name: str) -> dict[str, Any]:
    """A value set of ``helm/winnow/ci`` by its short name (``default`` for default-values.yaml)."""
    loaded: dict[str, Any] = yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())
    return loaded


def merged(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``change`` merged in, maps key by key (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def render(chart: Any, values: dict[str, Any], release: str = RELEASE) -> list[Obj]:
    """Every object the chart renders with ``values`` (NOTES.txt and empty documents left out)."""
    manifests = chart.render(values, name=release, namespace=NAMESPACE)
    objects: list[Obj] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def notes(chart: Any, values: dict[str, Any]) -> str:
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[Obj], kind: str, component: str) -> Obj:
    """The one object of ``kind`` whose component label is ``component``."""
    found = [
        o
        for o in of_kind(objects, kind)
        if o["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"{len(found)} {kind} objects of component {component}"
    return found[0]


def pod_specs(objects: list[Obj]) -> Iterator[tuple[str, Obj, Obj]]:
    """(name, pod metadata, pod spec) of every workload and bare pod."""
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            template = obj["spec"]["template"]
            yield obj["metadata"]["name"], template["metadata"], template["spec"]
        elif obj["kind"] == "Pod":
            yield obj["metadata"]["name"], obj["metadata"], obj["spec"]


def config_of(objects: list[Obj], container: Obj) -> dict[str, str]:
    """The ConfigMap data a container reads through envFrom."""
    data: dict[str, str] = {}
    maps = {o["metadata"]["name"]: o for o in of_kind(objects, "ConfigMap")}
    for source in container.get("envFrom", []):
        data.update(maps[source["configMapRef"]["name"]]["data"])
    return data


def env_names(objects: list[Obj], container: Obj) -> set[str]:
    """Every environment variable name a container gets (its env and its ConfigMap)."""
    return set(config_of(objects, container)) | {e["name"] for e in container.get("env", [])}


def leaves(values: Any, prefix: str = "") -> Iterator[str]:
    """Dotted paths of the leaf values (scalars, lists, empty maps) of a values tree."""
    if isinstance(values, dict) and values:
        for key, value in values.items():
            yield from leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip(".")
