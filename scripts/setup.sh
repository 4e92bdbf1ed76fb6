#!/usr/bin/env bash
# Create .venv with what the project needs (once; later runs reuse it).
# torch comes first and pinned: 2.13.0 is the CPU build this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, transformers, av, pytest" 2>/dev/null \
   || [ requirements.txt -nt .venv/.installed ] || [ requirements-dev.txt -nt .venv/.installed ]; then
    .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
    .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
    touch .venv/.installed
fi
