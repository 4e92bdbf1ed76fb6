#!/usr/bin/env bash
# The GPU checks still owed (issues 27 and 30), as one prepared run for a lent device machine
# (H100 or H200: Python 3.12, torch, transformers, no PyAV), sized to end within about 9 minutes so
# that a 15-minute device budget leaves room to start the machine and run it again.
#
#   bash scripts/gpu_checks.sh [OUTDIR]          # OUTDIR: the device tool's $OUT by default
#
# PyAV is carried as a wheel: once, here, in the repo's root (the folder is git-ignored by
#   echo /.whl/ >> .git/info/exclude):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl av==18.1.0
# then run with carry [".whl"]. At most 7 files land in OUTDIR (the device tool brings back 8).
# Each step has its own time limit; a step that fails or runs out is reported and the next one runs.
set -u
out=${1:-${OUT:-/tmp/adatp_gpu_checks}}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
summary="$out/summary.txt"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$py" -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__)" 2>&1
    "$py" -c "import av; print('av', av.__version__)" 2>&1 | tail -n 1
} >"$summary"

step() {  # step NAME SECONDS COMMAND...: its output in NAME.log, its exit status and time in the summary
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "$name: rc=$rc in $(( $(date +%s) - start )) s$([ $rc = 124 ] && echo ' (ran out of time)')" | tee -a "$summary"
    tail -n 20 "$out/$name.log"
}

# The CUDA-only paths: TailCausal's flash call with a bottom-right mask and its fallbacks, rows on the
# host against the device, static decoding's buckets and graphs.
step gpu_tests 150 "$py" -m pytest -q -s -p no:cacheprovider tests/gpu
# Every family's self-check on the card, "chunked prefill = one call" included.
step doctor 90 "$py" -m adatp_core doctor --device cuda
# Issue 30: Qwen3-VL-8B (random weights, bf16, 448x448) on a card capped to 24 GB: stock generate()
# against AdaTP streamed, peak and time to first token.
step long_video 200 "$py" bench/long_video.py --shape qwen3-vl-8b --device cuda --cap-gb 24 --new-tokens 1 \
    --frames 128,256,512 --modes stock,streamed --timeout 90 --model-frames 1800 --out "$out/long_video.json"
# Issue 30: a 30-minute video at 1 fps, streamed, answered within 24 GB.
step long_30min 150 "$py" bench/long_video.py --shape qwen3-vl-8b --device cuda --cap-gb 24 --new-tokens 16 \
    --seconds 1800 --video bench/results/long_video_30min.mp4 --sampling fps --fps 1 --frames 0 --modes streamed \
    --timeout 140 --model-frames 1800
cat "$summary"
