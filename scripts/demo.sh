#!/usr/bin/env bash
# The main job on the embedded default: built-in tiny model, the shipped sample video.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m adatp_core "$@"
