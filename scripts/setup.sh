#!/usr/bin/env bash
# Create .venv with what the project needs (once; later runs reuse it and return at once).
# torch comes first and pinned: 2.13.0 is the CPU build this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -f .venv/.installed ] && [ .venv/.installed -nt requirements.txt ] && [ .venv/.installed -nt requirements-dev.txt ]; then
    exit 0
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
touch .venv/.installed
