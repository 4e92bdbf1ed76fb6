"""Which gated-delta-rule and causal-conv1d code transformers runs for Qwen3.5 / Qwen3.6.

transformers 5.24 wraps the PyTorch functions of its Gated DeltaNet layers
(``models/qwen3_5/modeling_qwen3_5.py``, the same in ``qwen3_5_moe``) with
``integrations.hub_kernels.use_kernel_func_from_hub_with_fallback``. When that model module is
imported, the wrapper tries ``import fla`` (PyPI ``flash-linear-attention``, whose operations live in
``fla-core``) for ``chunk_gated_delta_rule`` (prefill) and ``fused_recurrent_gated_delta_rule``
(decode), and ``import causal_conv1d`` (PyPI ``causal-conv1d``) for ``causal_conv1d_fn`` and
``causal_conv1d_update``. A package that imports is used from then on, in that process, on every
device: transformers does not check that the tensors are on CUDA, and both packages are CUDA/Triton
kernels. One that does not import leaves transformers' PyTorch code, which warns once
("... is falling back to its reference PyTorch implementation ...").

The ``kernels`` package (Hugging Face hub kernels: kernels-community/fla, kernels-community/mamba-ssm)
is a third way: it is only fetched from the Hub when a model is loaded with ``use_kernels=True`` or a
``kernel_config``, which the pack never passes, so nothing is downloaded at run time.
``USE_HUB_KERNELS=0`` turns the hub decorators off altogether.

``linear_attention_kernels()`` reports this without importing torch, transformers or either package
and without installing anything: it reads what an already-imported transformers module chose, or
else predicts the choice from what is installed (``importlib.util.find_spec``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

# import name -> PyPI distributions that provide it (the first is the one to install)
KERNEL_PACKAGES = {"fla": ("flash-linear-attention", "fla-core"), "causal_conv1d": ("causal-conv1d",)}
# what the report calls each part -> (transformers' wrapped function, the package it prefers)
KERNEL_FUNCTIONS = {"gated_delta_rule": ("torch_chunk_gated_delta_rule", "fla"),
                    "causal_conv1d": ("causal_conv1d_fn", "causal_conv1d")}
TRANSFORMERS_MODULES = ("transformers.models.qwen3_5.modeling_qwen3_5",
                        "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
INSTALL_COMMANDS = ("python -m pip install flash-linear-attention",
                    "python -m pip install causal-conv1d --no-build-isolation")
# The PyTorch chunked delta rule's float32 intermediates, measured at 8192 tokens with 32 value
# heads of 128 (Qwen3.5-4B/9B/35B-A3B): peak growth per prompt token, per layer while it runs.
TORCH_FALLBACK_BYTES_PER_TOKEN = 200_000


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module without a spec
        return False


def _version(distributions: tuple[str, ...]) -> str | None:
    for dist in distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _chosen_by_transformers(function: str) -> bool | None:
    """Whether an imported transformers Qwen3.5 module runs ``function`` through its package (True)
    or its PyTorch code (False); None when no such module is imported or its wrapper is not the
    one described in the module docstring."""
    for name in TRANSFORMERS_MODULES:
        fn = getattr(sys.modules.get(name), function, None)
        for _ in range(4):  # the hub decorator may wrap transformers' wrapper once more
            code = getattr(fn, "__code__", None)
            if code is None:
                break
            if "is_new_implementation" in code.co_freevars and fn.__closure__:
                return bool(fn.__closure__[code.co_freevars.index("is_new_implementation")].cell_contents)
            fn = getattr(fn, "__wrapped__", None)
    return None


def linear_attention_kernels() -> dict:
    """What runs the Gated DeltaNet layers of Qwen3.5/3.6 in this process, as a JSON-able dict:

    - ``gated_delta_rule``: "fla" or "torch"; ``causal_conv1d``: "causal_conv1d" or "torch";
    - ``decided_by``: "transformers" (read from its imported Qwen3.5 module) or "installed
      packages" (transformers' Qwen3.5 module is not imported yet: what it will pick);
    - ``fast``: both fast kernels in use; ``cuda_only``: a fast kernel is in use, so a Qwen3.5 model
      on the CPU fails in this process;
    - ``packages``: for fla, causal_conv1d and kernels, whether it can be imported and its version;
    - ``hub_kernels``, ``install`` and, with the PyTorch delta rule, ``torch_fallback``.
    """
    packages = {name: {"pip": dists[0], "importable": _importable(name), "version": _version(dists)}
                for name, dists in {**KERNEL_PACKAGES, "kernels": ("kernels",)}.items()}
    report, from_transformers = {}, True
    for part, (function, package) in KERNEL_FUNCTIONS.items():
        chosen = _chosen_by_transformers(function)
        if chosen is None:
            from_transformers = False
            chosen = packages[package]["importable"]
        report[part] = package if chosen else "torch"
    fast = [report[part] != "torch" for part in KERNEL_FUNCTIONS]
    report.update(
        decided_by="transformers" if from_transformers else "installed packages",
        fast=all(fast), cuda_only=any(fast), packages=packages,
        hub_kernels=("not used: the pack never loads a model with use_kernels, so no kernel is downloaded"
                     + ("; USE_HUB_KERNELS=0 is set" if os.environ.get("USE_HUB_KERNELS", "").upper()
                        in ("0", "NO", "FALSE", "OFF") else "")),
        install=list(INSTALL_COMMANDS),
    )
    if report["gated_delta_rule"] == "torch":
        report["torch_fallback"] = (
            "transformers' PyTorch delta rule: correct but much slower on CUDA (a Python loop over 64-token "
            f"chunks), and about {TORCH_FALLBACK_BYTES_PER_TOKEN // 1000} kB of float32 intermediates per "
            "prompt token in each linear-attention layer while it runs (~2 GB for a 10,000-token video prompt)")
    return report


def kernels_line(report: dict | None = None) -> str:
    """One line for the stats and the self-check: what runs the Gated DeltaNet layers."""
    report = report if report is not None else linear_attention_kernels()
    if report["fast"]:
        return "flash-linear-attention + causal-conv1d (CUDA)"
    parts = [f"{part.replace('_', ' ')}: {'PyTorch' if report[part] == 'torch' else report[part]}"
             for part in KERNEL_FUNCTIONS]
    return "; ".join(parts) + " (faster on CUDA: " + " and ".join(INSTALL_COMMANDS) + ")"


def check_device(device_type: str, report: dict | None = None) -> None:
    """Refuse a linear-attention model off CUDA when transformers would run a CUDA-only kernel
    on it (it does not check the device; the run would fail deep inside Triton)."""
    from ..errors import AdaTPEnvironmentError

    report = report if report is not None else linear_attention_kernels()
    if device_type != "cuda" and report["cuda_only"]:
        used = [part for part in KERNEL_FUNCTIONS if report[part] != "torch"]
        raise AdaTPEnvironmentError(
            f"this model's linear-attention layers would run {' and '.join(report[part] for part in used)}, "
            f"which need CUDA, on {device_type}: transformers uses them whenever they are installed. "
            "Pick a CUDA device, or run the CPU from a Python without flash-linear-attention and "
            "causal-conv1d.")
