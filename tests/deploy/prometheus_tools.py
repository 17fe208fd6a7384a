"""Prometheus's own tools for the monitoring tests, and what the tests read from our files.

``promtool`` and ``prometheus`` come from Debian's package, unpacked into ``.tools/bin`` by
``scripts/setup.sh``; a test that needs one skips, saying so, where neither that folder nor
``PATH`` has it.
"""

import json
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Metric

ROOT = Path(__file__).resolve().parents[2]
FILES = ROOT / "helm" / "winnow" / "files"
RULES = FILES / "prometheus-rules.yaml"
DASHBOARDS = FILES / "dashboards"
RULE_TESTS = Path(__file__).parent / "rules-tests"

# What Grafana puts in for its variables before a query reaches Prometheus.
_GRAFANA_VARIABLES = {
    "${datasource}": "prometheus",
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_METRIC = re.compile(r'(?<![\w":.-])(winnow_[A-Za-z0-9_:]+|up)\b(?!\s*\()')


def tool(name: str) -> Path:
    """The path of ``promtool`` or ``prometheus``; skips the test when it is missing."""
    local = ROOT / ".tools" / "bin" / name
    if local.is_file():
        return local
    found = shutil.which(name)
    if found is None:
        pytest.skip(
            f"{name} is not installed: scripts/setup.sh unpacks Prometheus 2.42 from Debian's "
            f"package into .tools/bin (or put {name} on PATH)"
        )
    return Path(found)


def promtool(
    *args: str | Path, input_text: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Runs promtool (``input_text`` on its stdin); the result carries its output."""
    command = [str(tool("promtool")), *map(str, args)]
    return subprocess.run(
        command, input=input_text, capture_output=True, text=True, timeout=timeout, check=False
    )


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def alerts() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target, annotation and query variable."""
    found = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((f"panel {panel.get('title')!r}", target["expr"]))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            found.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            text = query.get("query") if isinstance(query, dict) else query
            found.append((f"variable {variable['name']!r}", text))
    return found


def concrete(expr: str, variables: dict[str, str]) -> str:
    """The query as Prometheus gets it: Grafana's variables replaced by plain values.

    ``variables`` gives the dashboard's own (job, instance: a regex that matches anything
    will do); Grafana's built-ins are known here.
    """
    values = {**{k.strip("${}"): v for k, v in _GRAFANA_VARIABLES.items()}, **variables}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(value, expr)


def label_values_query(text: str) -> str:
    """The selector inside Grafana's ``label_values(selector, label)``, else the text."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", text, re.S)
    return match.group(1) if match else text


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (Winnow's, and ``up``)."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(_METRIC.findall(without_strings))


def exposed_names(families: Iterable[Metric]) -> set[str]:
    """The names queries can use for these metric families (a registry's ``collect()`` or a
    parsed scrape): a counter's ``_total``, a histogram's ``_bucket``, ``_sum`` and ``_count``,
    whether or not a labelled family has samples yet."""
    names = set()
    for family in families:
        names.add(family.name)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        names.update(sample.name for sample in family.samples)
    return names


# -- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def wait_for(url: str, process: subprocess.Popen[Any], within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the process exited with {process.returncode}"
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {within:.0f} s")


def stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
