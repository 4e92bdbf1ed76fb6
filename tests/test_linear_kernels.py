"""linear_attention_kernels(): which Gated DeltaNet code transformers runs, reported without
importing anything heavy (the packages' presence is faked with find_spec; transformers' own choice is
read from its imported Qwen3.5 module)."""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
from pack import ROOT

from adatp_core.hf import kernels as lk


def _fake_specs(monkeypatch, installed: set[str]):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in ("fla", "causal_conv1d", "kernels"):
            return importlib.machinery.ModuleSpec(name, None) if name in installed else None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(lk.importlib.util, "find_spec", find_spec)


@pytest.fixture
def no_transformers_qwen(monkeypatch):
    for name in lk.TRANSFORMERS_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)


def test_nothing_installed_means_the_pytorch_code_and_says_what_it_costs(monkeypatch, no_transformers_qwen):
    _fake_specs(monkeypatch, set())
    report = lk.linear_attention_kernels()
    assert (report["gated_delta_rule"], report["causal_conv1d"]) == ("torch", "torch")
    assert report["decided_by"] == "installed packages" and not report["fast"] and not report["cuda_only"]
    assert "kB of float32 intermediates per prompt token" in report["torch_fallback"]
    assert report["packages"]["fla"]["pip"] == "flash-linear-attention" and not report["packages"]["fla"]["importable"]
    assert report["install"] == list(lk.INSTALL_COMMANDS) and "no kernel is downloaded" in report["hub_kernels"]
    json.dumps(report)  # the doctor and the stats print it as JSON


def test_each_package_switches_its_own_part(monkeypatch, no_transformers_qwen):
    _fake_specs(monkeypatch, {"fla"})
    report = lk.linear_attention_kernels()
    assert (report["gated_delta_rule"], report["causal_conv1d"]) == ("fla", "torch")
    assert report["cuda_only"] and not report["fast"] and "torch_fallback" not in report
    _fake_specs(monkeypatch, {"fla", "causal_conv1d", "kernels"})
    report = lk.linear_attention_kernels()
    assert (report["gated_delta_rule"], report["causal_conv1d"]) == ("fla", "causal_conv1d") and report["fast"]
    assert report["packages"]["kernels"]["importable"]


def test_an_imported_transformers_module_is_read_not_guessed(monkeypatch):
    """transformers decided when its Qwen3.5 module was imported; what is installed now does not
    change that, so the report follows the module, whatever find_spec says."""
    import transformers.models.qwen3_5.modeling_qwen3_5  # noqa: F401  (light: no weights)

    really = {name for name in ("fla", "causal_conv1d") if importlib.util.find_spec(name) is not None}
    _fake_specs(monkeypatch, {"fla", "causal_conv1d"} - really)  # claim the opposite of the truth
    report = lk.linear_attention_kernels()
    assert report["decided_by"] == "transformers"
    assert report["gated_delta_rule"] == ("fla" if "fla" in really else "torch")
    assert report["causal_conv1d"] == ("causal_conv1d" if "causal_conv1d" in really else "torch")


def _wrapper_like_transformers(is_new_implementation: bool):
    def torch_function(*args, **kwargs):
        return None

    def wrapped(*args, **kwargs):  # the shape of use_kernel_func_from_hub_with_fallback's wrapper
        return torch_function(*args, **kwargs) if not is_new_implementation else None

    wrapped.__wrapped__ = torch_function
    return wrapped


def test_a_fast_choice_made_by_transformers_is_reported(monkeypatch, no_transformers_qwen):
    _fake_specs(monkeypatch, set())  # nothing installed now: only the module's choice says fla
    module = types.ModuleType(lk.TRANSFORMERS_MODULES[1])
    module.torch_chunk_gated_delta_rule = _wrapper_like_transformers(True)
    inner = _wrapper_like_transformers(False)

    @functools.wraps(inner)  # a hub decorator around transformers' wrapper: found through __wrapped__
    def outer(*args, **kwargs):
        return inner(*args, **kwargs)

    module.causal_conv1d_fn = outer
    monkeypatch.setitem(sys.modules, lk.TRANSFORMERS_MODULES[1], module)
    report = lk.linear_attention_kernels()
    assert (report["gated_delta_rule"], report["causal_conv1d"], report["decided_by"]) == (
        "fla", "torch", "transformers")


def test_the_report_imports_nothing_heavy():
    code = ("import sys, adatp_core.hf.kernels as k; k.linear_attention_kernels(); "
            "print([m for m in ('torch', 'transformers', 'fla', 'causal_conv1d', 'kernels') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_a_linear_attention_model_off_cuda_with_cuda_only_kernels_is_refused_before_loading(monkeypatch, tmp_path):
    """transformers runs fla / causal-conv1d on any device once they import; on the CPU that fails
    deep in Triton. The loader refuses it first, with what to do; the plain PyTorch code loads."""
    from adatp_core.errors import AdaTPEnvironmentError
    from adatp_core.hf import kernels as linear_kernels
    from adatp_core.models.loader import load_video_llm
    from adatp_core.models.tiny_qwen import ensure_tiny_qwen3_5

    folder = ensure_tiny_qwen3_5(tmp_path)
    fast = dict(linear_kernels.linear_attention_kernels(), gated_delta_rule="fla", cuda_only=True)
    monkeypatch.setattr(linear_kernels, "linear_attention_kernels", lambda: fast)
    with pytest.raises(AdaTPEnvironmentError, match="need CUDA.*Pick a CUDA device"):
        load_video_llm(folder, device="cpu", dtype="float32")
    monkeypatch.undo()
    assert load_video_llm(folder, device="cpu", dtype="float32").adapter.linear_attention
    assert "PyTorch" in linear_kernels.kernels_line()


def test_a_kernel_package_that_fails_to_import_does_not_refuse_the_cpu(tmp_path):
    """transformers tries ``import fla`` and runs its PyTorch code when that raises (fla installed
    without Triton: a CPU-only or macOS Python). The loader asks the imported transformers class,
    not find_spec, so such a Python loads on the CPU; an fla that imports is still refused there."""
    from adatp_core.models.tiny_qwen import ensure_tiny_qwen3_5

    folder = ensure_tiny_qwen3_5(tmp_path / "cache")
    code = ("import sys; from adatp_core.models.loader import load_video_llm; from adatp_core.errors import "
            "AdaTPEnvironmentError\ntry:\n    load_video_llm(sys.argv[1], device='cpu', dtype='float32')\n"
            "    print('loaded')\nexcept AdaTPEnvironmentError as exc:\n    print('refused', exc)")
    results = {}
    for kind, init in (("broken", "raise ImportError('No module named triton')\n"), ("working", "")):
        fla = tmp_path / kind / "fla"
        (fla / "ops" / "gated_delta_rule").mkdir(parents=True)
        (fla / "__init__.py").write_text(init)
        (fla / "ops" / "__init__.py").write_text("")
        (fla / "ops" / "gated_delta_rule" / "__init__.py").write_text(
            "def chunk_gated_delta_rule(*a, **k):\n    raise RuntimeError('Triton needs CUDA')\n"
            "fused_recurrent_gated_delta_rule = chunk_gated_delta_rule\n")
        env = {**os.environ, "PYTHONPATH": f"{tmp_path / kind}{os.pathsep}{ROOT}"}
        out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
                             timeout=300, env=env, cwd=str(ROOT))
        results[kind] = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]
    assert results["broken"] == "loaded"
    assert results["working"].startswith("refused") and "fla" in results["working"]
