#!/usr/bin/env bash
# The family, cache and exactness tests at the declared minimum transformers, in .venv-min.
# The minimum is read from the `transformers>=X` line of requirements.txt (tests/test_versions.py
# keeps it equal to pyproject.toml's and to adatp_core/hf/versions.py's MINIMUM). .venv-min gets torch 2.13.0, then requirements.txt and
# requirements-dev.txt with transformers pinned to X. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-min

MIN=$(sed -n 's/^transformers[[:space:]]*>=[[:space:]]*\([0-9][0-9.]*\).*/\1/p' requirements.txt)
if [ -z "$MIN" ]; then
    echo "scripts/test_min.sh: requirements.txt has no 'transformers>=X' line to read the minimum from" >&2
    exit 2
fi

# The tests whose outcome depends on the transformers release: each family's adapter, stages and
# exactness tests against transformers' own classes; the caches that transformers' decoder layers
# are handed (static decoding, batched rows, the video prefix cache); and the spec's invariants
# through the nodes on the tiny dense (LLaVA-OV, Qwen2.5-VL, Qwen3-VL), hybrid (Qwen3.5) and MoE
# (Qwen3.5-MoE, Qwen3-VL-MoE) models. Left to the full suite at the newest release: what does not
# touch transformers' layers (the pack's own prefix-store accounting, every shipped workflow's
# wiring run again on every model), to keep this step to a few minutes.
TESTS=(
    tests/test_adapter.py tests/test_qwen_adapter.py tests/test_hybrid_adapter.py tests/test_qwen_vision.py
    tests/test_stages.py tests/test_qwen_stages.py tests/test_hybrid_stages.py
    tests/test_exactness.py tests/test_qwen_exactness.py tests/test_hybrid.py
    tests/test_static_decode.py tests/test_batching.py tests/test_qwen_batching.py tests/test_hybrid_batching.py
    tests/test_steps.py
    tests/test_prefix_cache.py tests/test_qwen_prefix_cache.py tests/test_cache_protocol.py tests/test_versions.py
    tests/test_nodes.py::test_nodes_chain_and_branch_independently
    tests/test_workflows.py::test_bypassing_both_debias_nodes_gives_fastv
    tests/test_qwen_workflows.py::test_spec_invariants_through_the_nodes
    tests/test_qwen_workflows.py::test_bypassing_both_debias_nodes_gives_fastv_on_qwen
    # --deselect takes node ids as pytest names them, relative to its rootdir, tests/
    --deselect test_prefix_cache.py::test_memory_stays_within_budget_after_50_videos
    --deselect test_qwen_prefix_cache.py::test_memory_stays_within_budget_after_50_videos
)

if ! { [ -f "$VENV/.installed" ] && [ "$(cat "$VENV/.installed")" = "$MIN" ] \
        && [ "$VENV/.installed" -nt requirements.txt ] && [ "$VENV/.installed" -nt requirements-dev.txt ]; }; then
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    "$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.13.0"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt \
        "transformers==$MIN"
    echo "$MIN" > "$VENV/.installed"
fi

"$VENV/bin/python" - "$MIN" <<'PY'
import sys
from packaging.version import Version
import transformers
if Version(transformers.__version__) != Version(sys.argv[1]):
    sys.exit(f"scripts/test_min.sh: .venv-min has transformers {transformers.__version__}, "
             f"not the declared minimum {sys.argv[1]}; delete .venv-min and rerun")
print(f"transformers {transformers.__version__} (the declared minimum, from requirements.txt)")
PY

status=0
"$VENV/bin/python" -m pytest "${TESTS[@]}" "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "scripts/test_min.sh: pytest collected no tests at the minimum; that is a failure, not a pass" >&2
    exit 1
fi
exit "$status"
