#!/usr/bin/env bash
# Creates .venv (Python 3.11+) and installs Winnow with every role (`[dev]` = `[all]` + test tools). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
# kcat (a plain librdkafka client) is used by the interop tests; Debian packages it.
if ! command -v kcat >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kcat) >/dev/null \
    || echo "setup: could not install kcat; its interop test will be skipped" >&2
fi
# chromium (Debian's, headless) is what the label app's browser test drives through Playwright;
# Playwright's own browser download is never used.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
    || echo "setup: could not install chromium; the label app's browser test will be skipped" >&2
fi
# promtool and the Prometheus server (Debian's `prometheus`) check the alert rules, the dashboard's
# queries and a real scrape. Only the binaries are unpacked into .tools/; no service is installed.
if [ ! -x .tools/bin/promtool ] && command -v apt-get >/dev/null 2>&1; then
  (
    set -e
    tmp="$(mktemp -d)"
    cd "$tmp"
    apt-get download prometheus >/dev/null 2>&1 \
      || { [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null && apt-get download prometheus >/dev/null; }
    dpkg -x prometheus_*.deb root
    cd - >/dev/null
    mkdir -p .tools/bin
    cp "$tmp/root/usr/bin/promtool" "$tmp/root/usr/bin/prometheus" .tools/bin/
    rm -rf "$tmp"
  ) || echo "setup: could not unpack promtool; the alert-rule and dashboard checks will be skipped" >&2
fi
# Label Studio (its own venv: its Django pins must not meet ours) is what the Label Studio bridge's
# end-to-end test runs against; WINNOW_LABEL_STUDIO_VENV overrides where it lives.
LS_VENV="${WINNOW_LABEL_STUDIO_VENV:-.venv-labelstudio}"
if [ ! -x "$LS_VENV/bin/label-studio" ]; then
  ( "$PYTHON" -m venv "$LS_VENV" && "$LS_VENV/bin/python" -m pip install --quiet "label-studio==1.23.*" ) \
    || echo "setup: could not install Label Studio; the bridge's end-to-end test will be skipped" >&2
fi
