"""The self-check: it passes on this CPU, says honestly what it cannot check here, and
turns a forced failure into a failed line with the setting that avoids it and a
non-zero exit status. (On a GPU: ``python -m adatp_core doctor --device cuda``.)"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT

from adatp_core import doctor, static_decode
from adatp_core.cli import main
from adatp_core.doctor import FAIL, PASS, SKIP, compare_tokens, run_doctor

CHECKS = ("keep-all = stock generate()", "AdaTP default = static decoding", "static graph reused",
          "no cuDNN attention", "selection without host sync", "figures", "2 rows = one at a time",
          "chunked prefill = one call", "kv on host = on device")


@pytest.fixture
def built_in(tiny_dir, monkeypatch):
    """The doctor's LLaVA-OV builds into the session's temporary cache, not the user's."""
    from adatp_core.models.tiny import TINY_MODEL_NAME

    monkeypatch.setattr(doctor, "families", lambda: {"LLaVA-OV": (lambda: tiny_dir, TINY_MODEL_NAME)})


def test_the_doctor_passes_on_this_cpu_and_skips_what_needs_cuda(built_in, capsys):
    seen = []
    report = run_doctor("cpu", "auto", on_check=seen.append)
    assert report.ok
    by_name = {c.name: c for c in report.checks}
    assert tuple(by_name) == CHECKS
    assert [c.name for c in seen] == [CHECKS[0], CHECKS[2], CHECKS[3], CHECKS[5], CHECKS[6], CHECKS[7],
                                      CHECKS[8]]  # each step's last line
    chunked = by_name["chunked prefill = one call"]
    assert chunked.status == PASS and "calls of 16 tokens; keep set the same" in chunked.detail
    kv = by_name["kv on host = on device"]
    assert kv.status == PASS and "K=1, kept tokens from K in calls of 16; 8 tokens equal" in kv.detail
    assert by_name["keep-all = stock generate()"].status == PASS
    assert by_name["AdaTP default = static decoding"].status == PASS
    graph = by_name["static graph reused"]
    assert graph.status == SKIP and "no CUDA graphs on cpu" in graph.detail and "reused" in graph.detail
    assert by_name["selection without host sync"].status == SKIP
    assert "cudnn" not in by_name["no cuDNN attention"].detail and "flash" in by_name["no cuDNN attention"].detail
    assert "TTFT" in by_name["figures"].detail and "ms/token" in by_name["figures"].detail
    env = report.environment
    for key in ("python", "torch", "transformers", "PyAV", "decord", "bitsandbytes", "device", "free memory",
                "SDPA kernels"):
        assert env[key]
    assert "CPU only" in env["torch"] or "CUDA" in env["torch"]
    text = report.text()
    assert text.splitlines()[-1].startswith("all checks passed") and "result  detail" in text


def test_a_failure_says_what_fails_and_what_avoids_it_and_exits_non_zero(built_in, monkeypatch, capsys):
    def replay_fails(self, *args):
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(static_decode.StaticDecoder, "__call__", replay_fails)
    from torch.nn.attention import SDPBackend

    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *a, **k: int(SDPBackend.CUDNN_ATTENTION.value))
    assert main(["doctor", "--device", "cpu", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    lines = {c["name"]: c for c in out["checks"]}
    static = lines["AdaTP default = static decoding"]
    assert static["status"] == FAIL and "previous error during capture" in static["detail"]
    assert "decode_mode=default" in static["detail"]
    assert lines["no cuDNN attention"]["status"] == FAIL
    assert "attention=flash_attention_2" in lines["no cuDNN attention"]["detail"]
    assert lines["keep-all = stock generate()"]["status"] == PASS  # one failure does not stop the others


def test_bad_device_or_family_is_a_clear_error(capsys):
    assert main(["doctor", "--device", "tpu9"]) == 2
    assert "unknown device" in capsys.readouterr().err
    assert main(["doctor", "--device", "cpu", "--family", "gemma"]) == 2
    assert "unknown model families" in capsys.readouterr().err


def _logits(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_tokens_compare_exactly_or_part_only_at_a_near_tie():
    ok, detail = compare_tokens((1, 2), _logits([[0, 5, 0], [0, 0, 5]]), (1, 2), _logits([[0, 5, 0], [0, 0, 5]]),
                                torch.float32)
    assert ok and detail.startswith("2 tokens equal")
    # Step 1 parts on a near tie in bfloat16 (gap 0.05 on a logit of 5): a pass that says so.
    ok, detail = compare_tokens((1, 2), _logits([[0, 5, 0], [0, 4.95, 5]]), (1, 1),
                                _logits([[0, 5, 0], [0, 5, 4.95]]), torch.bfloat16)
    assert ok and "near tie" in detail
    # The same gap is no tie in float32; nor is a clear gap in bfloat16.
    assert not compare_tokens((1, 2), _logits([[0, 5, 0], [0, 4.95, 5]]), (1, 1), None, torch.float32)[0]
    ok, detail = compare_tokens((1, 2), _logits([[0, 5, 0], [0, 2, 5]]), (1, 1), None, torch.bfloat16)
    assert not ok and "differ at step 1" in detail
    # One path stopped (EOS) where the other went on.
    assert not compare_tokens((1,), _logits([[0, 5, 0], [9, 0, 0]]), (1, 2), None, torch.float32)[0]


def test_selection_syncs_are_located_and_only_global_debias_transfer_is_allowed(monkeypatch):
    """CUDA's sync-debug warnings (faked here at chosen lines) become locations; one sync in
    global_debias is its designed transfer, anything else (or a second one) is reported."""
    import contextlib
    import inspect
    import warnings

    from adatp_core import debias, prune

    _, first = inspect.getsourcelines(debias.global_debias)
    _, prune_line = inspect.getsourcelines(prune.prune_tokens)
    places = []

    def select(state, cfg):
        for filename, line in places:
            warnings.warn_explicit("called a synchronizing CUDA operation", UserWarning, filename, line)
        return state

    monkeypatch.setattr(doctor, "sync_debug", lambda mode: contextlib.nullcontext())
    monkeypatch.setattr(doctor, "select", select)
    for sync_places, designed, others in (
            ([], 0, 0),
            ([(debias.__file__, first + 5)], 1, 0),
            ([(debias.__file__, first + 5), (debias.__file__, first + 6)], 1, 1),
            ([(debias.__file__, first + 5), (prune.__file__, prune_line + 3)], 1, 1),
            ([(debias.__file__, first - 3)], 0, 1)):  # debias.py, but outside global_debias
        places[:] = sync_places
        selected, where = doctor.selection_syncs("state", None)
        assert selected == "state" and len(where) == len(sync_places)
        got = doctor._designed_transfer(where)
        assert (len(got[0]), len(got[1])) == (designed, others), sync_places


def test_the_sdpa_spy_reports_the_kernel_each_call_runs_with():
    """Grouped-query calls (enable_gqa, as transformers makes them) included: each call is
    counted under the kernel SDPA picks for it, here on the CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, kv = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    spy = doctor.SdpaSpy()
    with torch.inference_mode(), spy:
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        with sdpa_kernel([SDPBackend.MATH]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool))
        torch.matmul(q, q.transpose(-1, -2))  # not attention: not counted
    assert dict(spy.counts) == {"FLASH_ATTENTION": 1, "MATH": 1}


def test_ci_runs_the_doctor_on_the_cpu_after_the_tests():
    run = (ROOT / ".ci" / "run").read_text()
    assert run.index("bash scripts/test.sh") < run.index("python -m adatp_core doctor --device cpu")


def test_families_by_their_model_type_and_devices_that_are_absent():
    """The README's family column names model types; an absent MPS or XPU device is the
    environment's error (exit 2), not a failed check."""
    from adatp_core.doctor import main as doctor_main

    assert doctor_main(["--device", "cpu", "--family", "bogus_family"]) == 2
    assert doctor_main(["--device", "cpu", "--family", "llava_onevision"]) == 0
    if not torch.backends.mps.is_available():
        assert doctor_main(["--device", "mps"]) == 2
    assert doctor_main(["--device", "meta"]) == 2


def test_the_kernels_line_says_what_transformers_runs_not_what_is_installed(tmp_path):
    """An fla that is installed but fails to import (no Triton) leaves transformers' PyTorch
    delta rule: the doctor's environment says so (it said fla, from find_spec), on transformers 5.25's
    kernels Func modules as on 5.17/5.24's plain wrappers; and, with no owner opt-in, that nothing
    is fetched from the Hub."""
    import os
    import subprocess
    import sys

    (tmp_path / "fla").mkdir()
    (tmp_path / "fla" / "__init__.py").write_text("raise ImportError('No module named triton')\n")
    code = ("import torch; from adatp_core.doctor import environment; "
            "print(environment(torch.device('cpu'), torch.float32)['Gated DeltaNet kernels'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**{k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"},
                              "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}, cwd=str(ROOT))
    assert out.stdout.startswith("gated delta rule: PyTorch"), out.stdout + out.stderr[-500:]
    assert out.stdout.strip().endswith("; nothing fetched from the Hub"), out.stdout


def test_a_model_refused_by_the_loader_gets_the_loaders_advice_only(monkeypatch):
    """The loader's own errors say what to do (here: the CUDA-only kernels); "try --dtype float32"
    is for anything else, and was appended to every failed load."""
    from adatp_core.errors import AdaTPEnvironmentError

    def refuse(*args, **kwargs):
        raise AdaTPEnvironmentError("this model's linear-attention layers would run fla, which need CUDA")

    monkeypatch.setattr(doctor, "load_video_llm", refuse)
    fam = doctor._Family("Qwen3.5", lambda: "folder", "name")
    doctor._run_family(fam, torch.device("cpu"), torch.float32, None, lambda check: None)
    assert [c.name for c in fam.checks] == ["load"] and fam.checks[0].status == FAIL
    assert "need CUDA" in fam.checks[0].detail and "--dtype" not in fam.checks[0].detail


def test_rows_decoded_together_that_part_from_one_at_a_time_fail_their_line(built_in, monkeypatch):
    """The 2-row line compares each row's tokens with the same question answered alone: a batched
    step that mixes up its rows (faked: each row gets the other's logits) fails it, with what avoids it."""
    from adatp_core import steps

    real = steps.StepRunner._default

    def swapped(self, tokens, positions, start, stop):
        logits = real(self, tokens, positions, start, stop)
        return logits.flip(0) if stop - start > 1 else logits

    monkeypatch.setattr(steps.StepRunner, "_default", swapped)
    report = run_doctor("cpu", "auto")
    line = {c.name: c for c in report.checks}["2 rows = one at a time"]
    assert line.status == FAIL and "tokens differ" in line.detail and "--batch-size 1" in line.detail
    assert not report.ok
