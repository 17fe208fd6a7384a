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
