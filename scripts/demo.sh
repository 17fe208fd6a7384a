#!/usr/bin/env bash
# Sets everything up, then runs the demo on the embedded broker. Arguments go to `winnow demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/winnow demo "$@"
