#!/usr/bin/env bash
# The main job on the embedded default: the shipped workflow workflows/adatp_video_qa.json,
# run headless with the built-in tiny model and the shipped sample video.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/run_workflow.py workflows/adatp_video_qa.json "$@"
