"""The self-check: it passes on this CPU, says honestly what it cannot check here, and
turns a forced failure into a failed line with the setting that avoids it and a
non-zero exit status. (On a GPU: ``python -m adatp_core doctor --device cuda``.)"""

from __future__ import annotations

import json

import pytest
import torch

from adatp_core import doctor, static_decode
from adatp_core.cli import main
from adatp_core.doctor import FAIL, PASS, SKIP, compare_tokens, run_doctor

CHECKS = ("keep-all = stock generate()", "AdaTP default = static decoding", "static graph reused",
          "no cuDNN attention", "selection without host sync", "figures")


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
    assert [c.name for c in seen] == [CHECKS[0], CHECKS[2], CHECKS[3], CHECKS[5]]  # the last line of each step
    assert by_name["keep-all = stock generate()"].status == PASS
    assert by_name["AdaTP default = static decoding"].status == PASS
    assert by_name["static graph reused"].status == SKIP and "no CUDA graphs on cpu" in by_name[
        "static graph reused"].detail
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
