"""Which code runs the Gated DeltaNet layers of Qwen3.5 / Qwen3.6, and whether any of it came from the Hub.

transformers 5.17, 5.24 and 5.25 decorate the same functions in ``models/qwen3_5/modeling_qwen3_5.py``
(and ``qwen3_5_moe``): ``chunk_gated_delta_rule`` (prefill) and ``fused_recurrent_gated_delta_rule``
(decode), ``causal_conv1d_fn`` and ``causal_conv1d_update``, each with
``integrations.hub_kernels.use_kernel_func_from_hub_with_fallback``. Three kinds of code can run:

1. **A hub kernel.** The decorator names each function for ``kernels.kernelize`` (the ``kernels``
   package), which replaces it, per model instance, with compiled code fetched from the Hub into the
   Hugging Face cache: kernels-community/fla for the delta rule, kernels-community/mamba-ssm for the
   convolution, on CUDA, ROCm and XPU only (5.25 also maps the whole ``Qwen3_5GatedDeltaNet`` layer to
   Atlas-Inference/gdn, with ``trust_remote_code``, on GB10 and Strix Halo). transformers kernelizes
   inside ``from_pretrained`` when ``use_kernels`` is true, after the weights are read:
   - 5.17 and 5.24: ``use_kernels`` defaults to False, and ``kernels`` is optional;
   - 5.25: it defaults to True unless ``USE_HUB_KERNELS`` is false, and ``kernels`` (0.19.x) is a
     requirement: without it every ``from_pretrained`` raises, on every device. On the CPU nothing is
     fetched (the mapping has no CPU entry). On CUDA, ``kernels`` asks the Hub (publisher trust check,
     version refs, file list) before it downloads; offline without a cached copy, or with no network,
     that raises a ValueError that ``kernelize`` does not catch, so the load fails; and an endpoint
     that accepts the connection but never answers hangs the load for good (huggingface_hub's client
     has no timeout: ``kernels/_internals/hf_hub.py`` ``_check_trust_remote_code`` ->
     ``HfApi.get_organization_overview``). ``lazy_load_kernel`` plays no part for these layers.
2. **A local package.** When the model module is imported, the decorator tries ``import fla`` (PyPI
   ``flash-linear-attention``, operations in ``fla-core``) and ``import causal_conv1d`` (PyPI
   ``causal-conv1d``); one that imports is used from then on in that process. 5.17 and 5.24 run it on
   every device (both are CUDA/Triton code, so a CPU run fails deep inside Triton); 5.25 runs it only
   for inputs on a device it supports (fla: cuda, xpu, mlu, npu; causal_conv1d: cuda) and PyTorch
   elsewhere.
3. **PyTorch**, transformers' reference code, which warns once that it "is falling back".

The pack's policy: it loads every model with ``use_kernels=False`` (``FROM_PRETRAINED_KWARGS``), so
on every release it runs the local package or PyTorch, fetches no code at run time, hangs on no
network, and works without ``kernels``. A server owner who sets ``USE_HUB_KERNELS`` to a true value
explicitly opts in: on transformers 5.25 or newer and a CUDA/XPU device, ``load_hub_kernels``
kernelizes the loaded model, and if that fails (offline without a cached kernel, no network, an
untrusted publisher) puts every layer back and keeps the local package or PyTorch. The pack never
sets an environment variable or any other process-wide switch.

``linear_attention_kernels()`` reports all this without importing torch, transformers, fla,
causal_conv1d or kernels, and without fetching anything: it reads what a loaded model and an
imported transformers module already chose, or else predicts it from what is installed
(``importlib.util.find_spec``) and the environment.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys

from ..errors import AdaTPEnvironmentError

log = logging.getLogger(__name__)

# import name -> PyPI distributions that provide it (the first is the one to install)
KERNEL_PACKAGES = {"fla": ("flash-linear-attention", "fla-core"), "causal_conv1d": ("causal-conv1d",)}
# what the report calls each part -> (transformers' decorated function, the package it prefers)
KERNEL_FUNCTIONS = {"gated_delta_rule": ("torch_chunk_gated_delta_rule", "fla"),
                    "causal_conv1d": ("causal_conv1d_fn", "causal_conv1d")}
# each part -> the name ``kernelize`` knows it by, and the hub repository 5.25 maps it to on CUDA
HUB_KERNELS = {"gated_delta_rule": ("chunk_gated_delta_rule", "kernels-community/fla"),
               "causal_conv1d": ("causal_conv1d_fn", "kernels-community/mamba-ssm")}
# the torch device types that transformers 5.25's mapping has these hub kernels for ("cuda" covers ROCm)
HUB_DEVICES = ("cuda", "xpu")
# where 5.25 lets each package run; 5.17 and 5.24 do not check the device
PACKAGE_DEVICES = {"fla": ("cuda", "xpu", "mlu", "npu"), "causal_conv1d": ("cuda",)}
# the first release that kernelizes by default, requires ``kernels`` and checks the package's device
HUB_BY_DEFAULT_FROM = (5, 25)
TRANSFORMERS_MODULES = ("transformers.models.qwen3_5.modeling_qwen3_5",
                        "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
INSTALL_COMMANDS = ("python -m pip install flash-linear-attention",
                    "python -m pip install causal-conv1d --no-build-isolation")
# every from_pretrained of the pack: transformers 5.25 would otherwise kernelize (fetch code) by default
FROM_PRETRAINED_KWARGS = {"use_kernels": False}
_TRUE = ("true", "1", "y", "yes", "on")  # transformers' is_env_variable_true
_FALSE = ("false", "0", "n", "no", "off")
# The PyTorch chunked delta rule's float32 intermediates, measured at 8192 tokens with 32 value
# heads of 128 (Qwen3.5-4B/9B/35B-A3B): peak growth per prompt token, per layer while it runs.
TORCH_FALLBACK_BYTES_PER_TOKEN = 200_000


def _importable(name: str) -> bool:
    """Whether ``name`` can be found for import (nothing is imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module without a spec
        return False


def _version(distributions: tuple[str, ...]) -> str | None:
    """The installed version of the first of ``distributions`` that is installed; None if none is."""
    for dist in distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _transformers_release() -> tuple[int, int] | None:
    """(major, minor) of the installed transformers, from its metadata (nothing imported); None if absent."""
    found = re.match(r"(\d+)\.(\d+)", _version(("transformers",)) or "")
    return (int(found[1]), int(found[2])) if found else None


def _hub_by_default() -> bool:
    """Whether the installed transformers kernelizes in ``from_pretrained`` unless told not to (5.25+)."""
    release = _transformers_release()
    return release is not None and release >= HUB_BY_DEFAULT_FROM


def _closure(fn) -> dict:
    """A function's closure as {free variable: value} (empty cells left out); {} for a non-function."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not cells:
        return {}
    found = {}
    for name, cell in zip(code.co_freevars, cells):
        try:
            found[name] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    return found


def _transformers_wrapper(obj) -> dict | None:
    """The closure of transformers' ``use_kernel_func_from_hub_with_fallback`` wrapper behind ``obj``.

    ``obj`` is the module attribute: the wrapper itself (no ``kernels``, or one transformers does not
    accept: its stub decorator returns the function), a function around it (``__wrapped__``), or a
    ``kernels`` Func module (``use_kernel_forward_from_hub`` on a function returns an ``nn.Module``
    instance whose class's ``forward`` closes over the function). Returns None when none is found."""
    pending, seen = [obj], set()
    while pending and len(seen) < 16:
        fn = pending.pop(0)
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        cells = _closure(fn)
        if "is_new_implementation" in cells:
            return cells
        pending.extend(value for value in cells.values() if callable(value))
        pending.append(getattr(fn, "__wrapped__", None))
        if not hasattr(fn, "__code__"):
            pending.append(getattr(type(fn), "forward", None))
    return None


def _chosen_by_transformers(function: str) -> dict | None:
    """What an imported transformers Qwen3.5 module runs for ``function``: {"package": whether its
    package imported, "checked": whether the wrapper checks the inputs' device (5.25+), "devices":
    where it then runs the package (None: every device)}; None when no such module is imported or its
    wrapper is not the one described in the module docstring."""
    for name in TRANSFORMERS_MODULES:
        cells = _transformers_wrapper(getattr(sys.modules.get(name), function, None))
        if cells is not None:
            devices = cells.get("supported_devices")
            return {"package": bool(cells["is_new_implementation"]), "checked": "supported_devices" in cells,
                    "devices": tuple(devices) if devices is not None else None}
    return None


def _repo_id(repo) -> str:
    """The Hub repository of a ``kernels`` LayerRepository (its str is "`owner/name` (revision...)")."""
    text = str(getattr(repo, "repo_id", None) or getattr(repo, "_repo_id", None) or repo)
    return text.split("`")[1] if text.count("`") >= 2 else text


def _model_hub_kernels(model) -> dict:
    """The hub kernels that ``kernelize`` put into ``model``'s linear-attention layers: {part: repo id},
    plus "layer" when the whole Gated DeltaNet layer was replaced. Read from the ``_kernel_repo`` that
    ``kernels`` records on each replaced function wrapper (``_kernel_funcs``) or layer."""
    for module in model.modules():
        funcs = module.__dict__.get("_kernel_funcs")
        if not isinstance(funcs, dict) or HUB_KERNELS["gated_delta_rule"][0] not in funcs:
            continue
        found = {}
        if module.__dict__.get("_kernel_repo") is not None:
            found["layer"] = _repo_id(module.__dict__["_kernel_repo"])
        for part, (name, _) in HUB_KERNELS.items():
            repo = getattr(funcs.get(name), "__dict__", {}).get("_kernel_repo")
            if repo is not None or "layer" in found:
                found[part] = _repo_id(repo) if repo is not None else found["layer"]
        return found
    return {}


def _process_hub_kernels() -> list[str]:
    """The hub repositories whose kernels this process has loaded (any caller, any pack), from the
    ``kernels`` package if something imported it; [] otherwise. Imports nothing."""
    registry = getattr(sys.modules.get("kernels"), "get_loaded_kernels", None)
    if registry is None:
        return []
    try:  # an older or changed kernels: the report never fails on it
        return sorted({str(getattr(getattr(k, "repo_info", None), "repo_id", None)
                           or getattr(getattr(k, "metadata", None), "name", None) or "?") for k in registry()})
    except Exception:  # noqa: BLE001
        return []


def _kernels_usable() -> bool:
    """Whether transformers accepts the installed ``kernels`` (its own version check when transformers
    is imported; else whether it can be imported at all)."""
    utils = sys.modules.get("transformers.utils.import_utils")
    check = getattr(utils, "is_kernels_available", None)
    if check is not None:
        try:
            return bool(check())
        except Exception:  # a changed signature: fall back to presence
            pass
    return _importable("kernels")


def hub_kernels_requested() -> bool:
    """Whether the server owner opted the pack into hub kernels: ``USE_HUB_KERNELS`` set explicitly
    to a true value (transformers' default "YES" when it is unset does not count)."""
    return os.environ.get("USE_HUB_KERNELS", "").strip().lower() in _TRUE


def hub_kernels_plan(device_type: str) -> tuple[bool, str]:
    """Whether ``load_hub_kernels`` will kernelize a model on ``device_type``, and why (a phrase).

    Returns (True, where the code comes from) or (False, why not)."""
    setting = os.environ.get("USE_HUB_KERNELS")
    if not hub_kernels_requested():
        if setting is not None and setting.strip().lower() in _FALSE:
            return False, f"USE_HUB_KERNELS={setting} turns hub kernels off"
        return False, "the pack loads models with use_kernels=False (USE_HUB_KERNELS=1 opts in)"
    if not _hub_by_default():
        return False, "the pack kernelizes on transformers 5.25 or newer only"
    if device_type not in HUB_DEVICES:
        return False, f"transformers maps no hub kernel for {device_type}"
    if not _kernels_usable():
        return False, ("USE_HUB_KERNELS is set but the kernels package is missing or not a version "
                       "transformers accepts")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True, "from the Hugging Face cache only (HF_HUB_OFFLINE=1)"
    return True, "fetched from the Hub at load unless already in the Hugging Face cache (USE_HUB_KERNELS=1)"


def _without_hub(part: str, device_type: str, packages: dict) -> tuple[str, bool, bool, bool]:
    """What runs ``part`` on ``device_type`` when no hub kernel replaced it. Returns (the package or
    "torch", whether an imported transformers module said so, whether transformers checks the
    device, whether the package is in use but not for this device)."""
    function, package = KERNEL_FUNCTIONS[part]
    chosen = _chosen_by_transformers(function)
    decided = chosen is not None
    if chosen is None:  # predicted: the package if it can be imported, where the release runs it
        checked = _hub_by_default()
        chosen = {"package": packages[package]["importable"], "checked": checked,
                  "devices": PACKAGE_DEVICES[package] if checked else None}
    elsewhere = chosen["devices"] is not None and device_type not in chosen["devices"]
    runs = chosen["package"] and not elsewhere
    return (package if runs else "torch"), decided, chosen["checked"], chosen["package"] and elsewhere


def linear_attention_kernels(device_type: str | None = None, model=None) -> dict:
    """What runs the Gated DeltaNet layers of Qwen3.5/3.6 on ``device_type`` (default: the model's
    device, else "cuda"), as a JSON-able dict:

    - ``gated_delta_rule``: "hub", "fla" or "torch"; ``causal_conv1d``: "hub", "causal_conv1d" or
      "torch"; ``hub_repos``: {part: hub repository} for the parts that run (or will run) a hub
      kernel, with "layer" when the whole layer was replaced; ``without_hub``: what those parts run
      if the hub kernel is not loaded;
    - ``device``; ``decided_by``: "the loaded model" (``model`` given), "transformers" (read from its
      imported Qwen3.5 module) or "installed packages" (a prediction: the module is not imported);
    - ``device_checked``: transformers runs a package only on the devices it supports (5.25+);
      ``not_on_this_device``: the packages it uses, but not on ``device_type``;
    - ``fast``: no part runs PyTorch; ``cuda_only``: a package runs that transformers would also run
      on a CPU (5.17/5.24), so a Qwen3.5 model off CUDA fails in this process;
    - ``download``: "happened" (hub kernel code is loaded in the model), "possible" (the next load
      kernelizes and fetches what is not cached), "none"; ``hub_kernels``: why, in words;
      ``hub_loaded``: every hub repository whose kernels this process loaded, for any caller;
    - ``packages``: for fla, causal_conv1d and kernels, whether it can be imported and its version;
    - ``install`` and, with the PyTorch delta rule, ``torch_fallback``.
    """
    if device_type is None:
        device_type = getattr(getattr(model, "device", None), "type", None) or "cuda"
    packages = {name: {"pip": dists[0], "importable": _importable(name), "version": _version(dists)}
                for name, dists in {**KERNEL_PACKAGES, "kernels": ("kernels",)}.items()}
    report, without, elsewhere, from_transformers, checked = {}, {}, [], True, True
    for part in KERNEL_FUNCTIONS:
        runs, decided, part_checked, other_devices = _without_hub(part, device_type, packages)
        without[part], from_transformers, checked = runs, from_transformers and decided, checked and part_checked
        elsewhere += [KERNEL_FUNCTIONS[part][1]] if other_devices else []
    planned, why = hub_kernels_plan(device_type)
    if model is not None:
        hub, decided_by = _model_hub_kernels(model), "the loaded model"
        download = "happened" if hub else "none"
        if hub:
            why = "hub kernel code loaded into this model (fetched from the Hub, now or on an earlier run)"
        elif planned:
            why = "hub kernels were asked for but not loaded (see the log): local package or PyTorch"
    else:
        hub = {part: repo for part, (_, repo) in HUB_KERNELS.items()} if planned else {}
        decided_by = "transformers" if from_transformers else "installed packages"
        download = "possible" if planned else "none"
    for part in KERNEL_FUNCTIONS:
        report[part] = "hub" if part in hub else without[part]
    fast = [report[part] != "torch" for part in KERNEL_FUNCTIONS]
    packaged = [report[part] not in ("torch", "hub") for part in KERNEL_FUNCTIONS]
    report.update(
        device=device_type, decided_by=decided_by, device_checked=checked, not_on_this_device=elsewhere,
        hub_repos=hub, without_hub={part: without[part] for part in KERNEL_FUNCTIONS if part in hub},
        fast=all(fast), cuda_only=any(packaged) and not checked,
        download=download, hub_kernels=why, hub_loaded=_process_hub_kernels(),
        packages=packages, install=list(INSTALL_COMMANDS),
    )
    if report["gated_delta_rule"] == "torch":
        report["torch_fallback"] = (
            "transformers' PyTorch delta rule: correct but much slower on CUDA (a Python loop over 64-token "
            f"chunks), and about {TORCH_FALLBACK_BYTES_PER_TOKEN // 1000} kB of float32 intermediates per "
            "prompt token in each linear-attention layer while it runs (~2 GB for a 10,000-token video prompt)")
    return report


def _part_text(report: dict, part: str) -> str:
    """How the line names the code that runs ``part``: "hub kernel <repo>", the package, or "PyTorch"."""
    runs, package = report[part], KERNEL_FUNCTIONS[part][1]
    if runs == "hub":
        return f"hub kernel {report['hub_repos'][part]}"
    if runs == "torch":
        unused = package in report["not_on_this_device"]
        return f"PyTorch ({package} is not used on {report['device']})" if unused else "PyTorch"
    return runs


def _parts_text(report: dict, separator: str) -> str:
    """Each part and the code that runs it, e.g. "gated delta rule: fla; causal conv1d: PyTorch"."""
    return separator.join(f"{part.replace('_', ' ')}: {_part_text(report, part)}" for part in KERNEL_FUNCTIONS)


def kernels_line_as_decided(device_type: str) -> str:
    """``kernels_line`` on ``device_type`` as transformers decides it: its Qwen3.5 module imported
    first (a kernel package that is installed but fails to import is not used; find_spec alone would
    say it is). Whatever that import raises leaves the prediction from what is installed."""
    try:
        importlib.import_module(TRANSFORMERS_MODULES[0])
    except Exception:  # noqa: BLE001  a transformers without the module, or one that fails to import it
        pass
    return kernels_line(device_type=device_type)


def kernels_line(report: dict | None = None, *, model=None, device_type: str | None = None) -> str:
    """One line for the stats and the self-check: what runs the Gated DeltaNet layers, and whether
    code was or would be fetched from the Hub. ``report`` defaults to ``linear_attention_kernels``
    for ``device_type`` and ``model``."""
    report = report if report is not None else linear_attention_kernels(device_type, model)
    line = _parts_text(report, "; ")
    if "torch" in (report[part] for part in KERNEL_FUNCTIONS):
        line += " (faster on CUDA: " + " and ".join(INSTALL_COMMANDS) + ")"
    hub = {"happened": "hub code loaded", "possible": "hub kernels " + report["hub_kernels"],
           "none": "nothing fetched from the Hub"}[report["download"]]
    others = [repo for repo in report["hub_loaded"] if repo not in report["hub_repos"].values()]
    if others:
        hub += f" (this process also loaded hub kernels for other models: {', '.join(others)})"
    return f"{line}; {hub}"


def check_device(device_type: str, report: dict | None = None) -> None:
    """Refuse a linear-attention model off CUDA when transformers would run a CUDA-only package on
    it: 5.17 and 5.24 do not check the device, and the run would fail deep inside Triton. 5.25 runs
    PyTorch for such inputs, and hub kernels are only loaded for CUDA/XPU, so nothing is refused there.
    Returns None; raises AdaTPEnvironmentError with what to do."""
    report = report if report is not None else linear_attention_kernels(device_type)
    if device_type != "cuda" and report["cuda_only"]:
        used = [part for part in KERNEL_FUNCTIONS if report[part] not in ("torch", "hub")]
        raise AdaTPEnvironmentError(
            f"this model's linear-attention layers would run {' and '.join(report[part] for part in used)}, "
            f"which need CUDA, on {device_type}: transformers uses them whenever they are installed. "
            "Pick a CUDA device, or run the CPU from a Python without flash-linear-attention and "
            "causal-conv1d (or with transformers 5.25 or newer, which runs PyTorch there).")


def load_hub_kernels(model, device_type: str) -> str | None:
    """Kernelize ``model`` (loaded with ``FROM_PRETRAINED_KWARGS``) when the server owner opted in
    (``hub_kernels_plan``); when that fails, put every layer back, so the local package or PyTorch
    runs. Never raises for a fetch that fails (offline without a cached kernel, no network, an
    untrusted publisher); a user's interrupt and running out of memory still propagate.

    Returns None when nothing was tried, else one line saying what happened (also logged)."""
    from ..memory import fallback_allowed  # torch: this module reads what is installed without importing it

    planned, why = hub_kernels_plan(device_type)
    if not planned or not hasattr(model, "reset_kernels"):  # reset_kernels: transformers 5.25+
        return None
    try:
        model.set_use_kernels(True)
    except Exception as exc:
        if not fallback_allowed(exc):
            raise
        model.reset_kernels()  # a layer kernelized before the failure runs its own code again
        runs = linear_attention_kernels(device_type, model)
        line = (f"hub kernels could not be loaded ({type(exc).__name__}: {str(exc)[:300]}); the linear layers run "
                + _parts_text(runs, ", ")
                + ". To use hub kernels offline, load once online first; to stop trying, unset USE_HUB_KERNELS")
        log.warning(line)
        return line
    line = f"hub kernels {why}: {kernels_line(model=model, device_type=device_type)}"
    log.info(line)
    return line
