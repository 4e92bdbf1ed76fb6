"""linear_attention_kernels(): which Gated DeltaNet code runs (a hub kernel, fla / causal-conv1d, or
PyTorch), and whether code was or would be fetched from the Hub; reported without importing anything
heavy. Each release's mechanism is faked (find_spec for what is installed, transformers' wrapper
shapes, kernels' Func modules and ``_kernel_repo`` records); the installed transformers is read for
real; and the pack's loading policy (``use_kernels=False`` unless USE_HUB_KERNELS opts in, and a
failed fetch falls back) runs through the loader on the CPU."""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import types

import pytest
from pack import ROOT

from adatp_core.errors import AdaTPInterrupted
from adatp_core.hf import kernels as lk

RELEASE = lk._transformers_release()
HUB_BY_DEFAULT = RELEASE is not None and RELEASE >= lk.HUB_BY_DEFAULT_FROM
INSTALLED = ".".join(map(str, RELEASE or ()))


def _fake_specs(monkeypatch, installed: set[str]):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in ("fla", "causal_conv1d", "kernels"):
            return importlib.machinery.ModuleSpec(name, None) if name in installed else None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(lk.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(lk, "_kernels_usable", lambda: "kernels" in installed)


def _release(monkeypatch, release: tuple[int, int]):
    monkeypatch.setattr(lk, "_transformers_release", lambda: release)


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    """No owner setting leaks in: USE_HUB_KERNELS and HF_HUB_OFFLINE unset."""
    for name in ("USE_HUB_KERNELS", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


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
    assert report["install"] == list(lk.INSTALL_COMMANDS)
    assert report["download"] == "none" and "use_kernels=False" in report["hub_kernels"] and not report["hub_repos"]
    assert lk.kernels_line(report).endswith("nothing fetched from the Hub")
    json.dumps(report)  # the doctor and the stats print it as JSON


def test_each_package_switches_its_own_part_on_every_device_before_5_25(monkeypatch, no_transformers_qwen):
    _release(monkeypatch, (5, 24))
    _fake_specs(monkeypatch, {"fla"})
    report = lk.linear_attention_kernels("cpu")
    assert (report["gated_delta_rule"], report["causal_conv1d"]) == ("fla", "torch")
    assert report["cuda_only"] and not report["fast"] and not report["device_checked"]
    assert "torch_fallback" not in report
    _fake_specs(monkeypatch, {"fla", "causal_conv1d", "kernels"})
    report = lk.linear_attention_kernels()
    assert (report["gated_delta_rule"], report["causal_conv1d"]) == ("fla", "causal_conv1d") and report["fast"]
    assert report["packages"]["kernels"]["importable"] and report["download"] == "none"


def test_from_5_25_a_package_runs_only_on_the_devices_it_supports(monkeypatch, no_transformers_qwen):
    _release(monkeypatch, (5, 25))
    _fake_specs(monkeypatch, {"fla", "causal_conv1d", "kernels"})
    on_cpu = lk.linear_attention_kernels("cpu")
    assert (on_cpu["gated_delta_rule"], on_cpu["causal_conv1d"]) == ("torch", "torch")
    assert on_cpu["device_checked"] and not on_cpu["cuda_only"]
    assert lk.kernels_line(on_cpu).startswith("gated delta rule: PyTorch (fla is not used on cpu)")
    lk.check_device("cpu", on_cpu)  # nothing to refuse: transformers runs PyTorch there
    on_xpu = lk.linear_attention_kernels("xpu")
    assert (on_xpu["gated_delta_rule"], on_xpu["causal_conv1d"]) == ("fla", "torch")
    assert lk.linear_attention_kernels("cuda")["fast"]


def test_an_imported_transformers_module_is_read_not_guessed(monkeypatch):
    """transformers decided when its Qwen3.5 module was imported; what is installed now does not
    change that, so the report follows the module, whatever find_spec says. On 5.25 with ``kernels``
    the module attribute is a kernels Func module, read through to transformers' wrapper."""
    import transformers.models.qwen3_5.modeling_qwen3_5  # noqa: F401  (light: no weights)

    really = {name for name in ("fla", "causal_conv1d") if importlib.util.find_spec(name) is not None}
    _fake_specs(monkeypatch, {"fla", "causal_conv1d"} - really)  # claim the opposite of the truth
    report = lk.linear_attention_kernels("cuda")
    assert report["decided_by"] == "transformers"
    assert report["gated_delta_rule"] == ("fla" if "fla" in really else "torch")
    assert report["causal_conv1d"] == ("causal_conv1d" if "causal_conv1d" in really else "torch")
    assert report["device_checked"] == HUB_BY_DEFAULT  # 5.25 added the device check to the wrapper


def _wrapper_like_transformers(is_new_implementation: bool, supported_devices=None, checks_device=False):
    """The shape of use_kernel_func_from_hub_with_fallback's wrapper: 5.17/5.24's closes over
    ``is_new_implementation``; 5.25's also over ``supported_devices``."""
    def torch_function(*args, **kwargs):
        return None

    if checks_device:
        def wrapped(*args, **kwargs):
            unsupported = supported_devices is not None and "cpu" not in supported_devices
            return torch_function(*args, **kwargs) if not is_new_implementation or unsupported else None
    else:
        def wrapped(*args, **kwargs):
            return torch_function(*args, **kwargs) if not is_new_implementation else None

    wrapped.__wrapped__ = torch_function
    return wrapped


def _func_module(func):
    """kernels' use_kernel_forward_from_hub on a function: an instance of a module class whose forward
    calls the function it closes over (no __code__ on the instance)."""
    class Func:
        def forward(self, *args, **kwargs):
            return func(*args, **kwargs)

        def __call__(self, *args, **kwargs):
            return self.forward(*args, **kwargs)

    return Func()


def _fake_module(monkeypatch, **functions):
    module = types.ModuleType(lk.TRANSFORMERS_MODULES[1])
    for name, value in functions.items():
        setattr(module, name, value)
    monkeypatch.setitem(sys.modules, lk.TRANSFORMERS_MODULES[1], module)


def test_a_fast_choice_made_by_transformers_5_24_is_reported_and_refused_off_cuda(monkeypatch, no_transformers_qwen):
    from adatp_core.errors import AdaTPEnvironmentError

    _fake_specs(monkeypatch, set())  # nothing installed now: only the module's choice says fla
    inner = _wrapper_like_transformers(False)

    @functools.wraps(inner)  # a function around transformers' wrapper: found through __wrapped__
    def outer(*args, **kwargs):
        return inner(*args, **kwargs)

    _fake_module(monkeypatch, torch_chunk_gated_delta_rule=_wrapper_like_transformers(True), causal_conv1d_fn=outer)
    report = lk.linear_attention_kernels("cpu")
    assert (report["gated_delta_rule"], report["causal_conv1d"], report["decided_by"]) == (
        "fla", "torch", "transformers")
    assert report["cuda_only"] and not report["device_checked"]
    with pytest.raises(AdaTPEnvironmentError, match="would run fla, which need CUDA, on cpu.*Pick a CUDA device"):
        lk.check_device("cpu", report)
    lk.check_device("cuda", lk.linear_attention_kernels("cuda"))


def test_transformers_5_25_behind_a_kernels_func_module_is_read_per_device(monkeypatch, no_transformers_qwen):
    """5.25 with ``kernels`` installed: the module attribute is a Func module; transformers' wrapper
    inside runs fla only for inputs on its devices, so the CPU is not refused."""
    _fake_specs(monkeypatch, set())
    _fake_module(monkeypatch,
                 torch_chunk_gated_delta_rule=_func_module(
                     _wrapper_like_transformers(True, ("cuda", "xpu", "mlu", "npu"), checks_device=True)),
                 causal_conv1d_fn=_func_module(_wrapper_like_transformers(False, None, checks_device=True)))
    on_cpu, on_cuda = lk.linear_attention_kernels("cpu"), lk.linear_attention_kernels("cuda")
    assert on_cpu["decided_by"] == on_cuda["decided_by"] == "transformers"
    assert (on_cpu["gated_delta_rule"], on_cuda["gated_delta_rule"]) == ("torch", "fla")
    assert on_cpu["device_checked"] and not on_cpu["cuda_only"] and on_cuda["causal_conv1d"] == "torch"
    lk.check_device("cpu", on_cpu)


class _Repo:
    """The str of kernels' LayerRepository."""

    def __init__(self, repo_id: str, layer: str):
        self.text = f"`{repo_id}` (revision: version 3), layer `{layer}`"

    def __str__(self):
        return self.text


class _Fake:
    """An object with a __dict__, like an nn.Module instance."""


def _kernelized_model(device: str, *, parts=(), whole_layer: str | None = None):
    """A model whose linear-attention layer holds kernels' per-model function wrappers
    (``_kernel_funcs``), with ``_kernel_repo`` recorded on those ``kernelize`` replaced."""
    layer = _Fake()
    layer._kernel_funcs = {}
    for name in ("fused_recurrent_gated_delta_rule", "chunk_gated_delta_rule", "causal_conv1d_forward",
                 "causal_conv1d_fn", "causal_conv1d_update"):
        layer._kernel_funcs[name] = _Fake()
    for part in parts:
        name, repo = lk.HUB_KERNELS[part]
        layer._kernel_funcs[name]._kernel_repo = _Repo(repo, name)
    if whole_layer:
        layer._kernel_repo = _Repo(whole_layer, "Qwen3_5GatedDeltaNet")
    model = types.SimpleNamespace(device=types.SimpleNamespace(type=device), modules=lambda: [_Fake(), layer])
    return model


def test_hub_kernels_in_a_loaded_model_are_read_from_the_model(monkeypatch, no_transformers_qwen):
    _fake_specs(monkeypatch, {"kernels"})
    report = lk.linear_attention_kernels(model=_kernelized_model("cuda", parts=("gated_delta_rule",)))
    assert (report["gated_delta_rule"], report["causal_conv1d"]) == ("hub", "torch")
    assert report["hub_repos"] == {"gated_delta_rule": "kernels-community/fla"}
    assert report["decided_by"] == "the loaded model" and report["device"] == "cuda"
    assert report["download"] == "happened" and report["without_hub"] == {"gated_delta_rule": "torch"}
    line = lk.kernels_line(report)
    assert line.startswith("gated delta rule: hub kernel kernels-community/fla; causal conv1d: PyTorch")
    assert line.endswith("hub code loaded")

    whole = lk.linear_attention_kernels(model=_kernelized_model("cuda", whole_layer="Atlas-Inference/gdn"))
    assert whole["hub_repos"] == {"layer": "Atlas-Inference/gdn", "gated_delta_rule": "Atlas-Inference/gdn",
                                  "causal_conv1d": "Atlas-Inference/gdn"}

    plain = lk.linear_attention_kernels(model=_kernelized_model("cpu"))
    assert plain["download"] == "none" and plain["device"] == "cpu" and not plain["hub_repos"]


def test_hub_kernels_loaded_by_other_code_in_the_process_are_named_but_not_claimed(monkeypatch, no_transformers_qwen):
    _fake_specs(monkeypatch, set())
    loaded = [types.SimpleNamespace(repo_info=types.SimpleNamespace(repo_id="kernels-community/liger-kernels"),
                                    metadata=types.SimpleNamespace(name="liger"))]
    monkeypatch.setitem(sys.modules, "kernels", types.SimpleNamespace(get_loaded_kernels=lambda: loaded))
    report = lk.linear_attention_kernels(model=_kernelized_model("cuda"))
    assert report["hub_loaded"] == ["kernels-community/liger-kernels"] and report["download"] == "none"
    assert "other models: kernels-community/liger-kernels" in lk.kernels_line(report)


def test_a_changed_kernels_registry_leaves_the_report_whole(monkeypatch, no_transformers_qwen):
    """get_loaded_kernels returning objects of another shape, or raising, is no loaded kernel."""
    _fake_specs(monkeypatch, set())
    for registry in (lambda: [object()], lambda: 1 / 0):
        monkeypatch.setitem(sys.modules, "kernels", types.SimpleNamespace(get_loaded_kernels=registry))
        report = lk.linear_attention_kernels(model=_kernelized_model("cuda"))
        assert report["hub_loaded"] in ([], ["?"]) and lk.kernels_line(report)


@pytest.mark.parametrize("value, requested", [(None, False), ("YES", True), ("1", True), ("on", True),
                                              ("0", False), ("no", False), ("", False)])
def test_only_an_explicit_use_hub_kernels_opts_the_pack_in(monkeypatch, value, requested):
    if value is not None:
        monkeypatch.setenv("USE_HUB_KERNELS", value)
    assert lk.hub_kernels_requested() is requested


def test_the_hub_plan_names_why_and_where_the_code_would_come_from(monkeypatch, no_transformers_qwen):
    _fake_specs(monkeypatch, {"kernels"})
    _release(monkeypatch, (5, 25))
    not_asked = "the pack loads models with use_kernels=False (USE_HUB_KERNELS=1 opts in)"
    assert lk.hub_kernels_plan("cuda") == (False, not_asked)
    monkeypatch.setenv("USE_HUB_KERNELS", "0")
    assert lk.hub_kernels_plan("cuda") == (False, "USE_HUB_KERNELS=0 turns hub kernels off")
    monkeypatch.setenv("USE_HUB_KERNELS", "1")
    planned, why = lk.hub_kernels_plan("cuda")
    assert planned and "fetched from the Hub at load" in why
    assert lk.hub_kernels_plan("cpu") == (False, "transformers maps no hub kernel for cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert lk.hub_kernels_plan("cuda") == (True, "from the Hugging Face cache only (HF_HUB_OFFLINE=1)")
    _release(monkeypatch, (5, 24))
    assert lk.hub_kernels_plan("cuda") == (False, "the pack kernelizes on transformers 5.25 or newer only")
    _release(monkeypatch, (5, 25))
    _fake_specs(monkeypatch, set())
    assert not lk.hub_kernels_plan("cuda")[0]


def test_a_planned_hub_kernel_is_reported_as_a_possible_download(monkeypatch, no_transformers_qwen):
    _fake_specs(monkeypatch, {"kernels", "fla"})
    _release(monkeypatch, (5, 25))
    monkeypatch.setenv("USE_HUB_KERNELS", "1")
    report = lk.linear_attention_kernels("cuda")
    assert (report["gated_delta_rule"], report["causal_conv1d"], report["download"]) == ("hub", "hub", "possible")
    assert report["without_hub"] == {"gated_delta_rule": "fla", "causal_conv1d": "torch"}
    line = lk.kernels_line(report)
    assert line.startswith("gated delta rule: hub kernel kernels-community/fla; "
                           "causal conv1d: hub kernel kernels-community/mamba-ssm; hub kernels fetched from the Hub")
    assert lk.linear_attention_kernels("cpu")["download"] == "none"


class _KernelizableModel:
    """The two calls load_hub_kernels makes on a transformers 5.25 model."""

    def __init__(self, fails: BaseException | None = None):
        self.fails, self.calls = fails, []
        self.device = types.SimpleNamespace(type="cuda")

    def set_use_kernels(self, use_kernels):
        self.calls.append(("set_use_kernels", use_kernels))
        if self.fails is not None:
            raise self.fails

    def reset_kernels(self):
        self.calls.append(("reset_kernels",))

    def modules(self):
        return []


def test_the_pack_kernelizes_only_when_the_owner_opted_in(monkeypatch, no_transformers_qwen):
    _fake_specs(monkeypatch, {"kernels"})
    _release(monkeypatch, (5, 25))
    model = _KernelizableModel()
    assert lk.load_hub_kernels(model, "cuda") is None and model.calls == []
    monkeypatch.setenv("USE_HUB_KERNELS", "1")
    assert lk.load_hub_kernels(model, "cpu") is None and model.calls == []
    assert lk.load_hub_kernels(types.SimpleNamespace(), "cuda") is None  # transformers < 5.25: no reset_kernels
    assert lk.load_hub_kernels(model, "cuda").startswith("hub kernels fetched from the Hub")
    assert model.calls == [("set_use_kernels", True)]


def test_a_fetch_that_fails_falls_back_and_says_what_to_do(monkeypatch, caplog, no_transformers_qwen):
    """kernels raises ValueError offline without a cached kernel, and with no network (its publisher
    trust check); the pack puts every layer back and runs the local package or PyTorch."""
    _fake_specs(monkeypatch, {"kernels"})
    _release(monkeypatch, (5, 25))
    monkeypatch.setenv("USE_HUB_KERNELS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = _KernelizableModel(ValueError("Version 3 of 'kernels-community/fla' is not available in the local cache "
                                          "and Hugging Face Hub is in offline mode."))
    with caplog.at_level(logging.WARNING, logger=lk.__name__):
        line = lk.load_hub_kernels(model, "cuda")
    assert model.calls == [("set_use_kernels", True), ("reset_kernels",)]
    assert "could not be loaded (ValueError: Version 3 of 'kernels-community/fla'" in line
    assert "run gated delta rule: PyTorch, causal conv1d: PyTorch." in line and "unset USE_HUB_KERNELS" in line
    assert line in caplog.text

    stopped = _KernelizableModel(AdaTPInterrupted("cancelled"))  # the user's Cancel is never swallowed
    with pytest.raises(AdaTPInterrupted):
        lk.load_hub_kernels(stopped, "cuda")


def test_the_hub_names_match_the_installed_transformers():
    """HUB_KERNELS, HUB_DEVICES and PACKAGE_DEVICES restate transformers 5.25's own tables; this
    fails on the release that changes them."""
    if not HUB_BY_DEFAULT:
        pytest.skip(f"transformers {INSTALLED} has no hub kernels by default (5.25 and newer do)")
    hub = pytest.importorskip("transformers.integrations.hub_kernels")
    assert hub._PACKAGE_SUPPORTED_DEVICES["fla"] == lk.PACKAGE_DEVICES["fla"]
    assert hub._PACKAGE_SUPPORTED_DEVICES["causal_conv1d"] == lk.PACKAGE_DEVICES["causal_conv1d"]
    if not hasattr(hub, "get_kernel_mapping_transformers"):
        pytest.skip("the kernels package that transformers accepts is not installed")
    mapping = hub.get_kernel_mapping_transformers()
    for name, repo in lk.HUB_KERNELS.values():
        for device in ("cuda", "xpu"):
            repos = mapping[name][device]
            assert {lk._repo_id(r) for r in (repos.values() if isinstance(repos, dict) else [repos])} == {repo}
        assert "cpu" not in mapping[name]


def test_the_report_imports_nothing_heavy():
    code = ("import sys, adatp_core.hf.kernels as k; k.linear_attention_kernels(); k.kernels_line(device_type='cpu'); "
            "print([m for m in ('torch', 'transformers', 'fla', 'causal_conv1d', 'kernels') if m in sys.modules])")
    env = {**os.environ, "USE_HUB_KERNELS": "1"}  # a planned fetch is predicted, not started
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, env=env)
    assert out.stdout.strip() == "[]"


def test_loading_on_the_cpu_fetches_nothing_and_passes_use_kernels_false(monkeypatch, tmp_path):
    """Through the pack's loader with the installed transformers (5.25 would kernelize by default):
    no connection is opened, and the loaded model reports no hub code."""
    from adatp_core.models.loader import load_video_llm
    from adatp_core.models.tiny_qwen import ensure_tiny_qwen3_5

    folder = ensure_tiny_qwen3_5(tmp_path)
    opened = []

    def refuse(self, address):
        opened.append(address)
        raise OSError("the test allows no connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    llm = load_video_llm(folder, device="cpu", dtype="float32")
    assert opened == [] and llm.model.use_kernels is False
    report = lk.linear_attention_kernels(model=llm.model)
    assert report["decided_by"] == "the loaded model" and report["device"] == "cpu" and report["download"] == "none"
    assert (report["gated_delta_rule"], report["causal_conv1d"]) == ("torch", "torch")


def _run(code: str, folder, env: dict, timeout: int = 300) -> str:
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **env}, cwd=str(ROOT))
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-800:]


def test_a_python_without_the_kernels_package_still_loads(tmp_path):
    """transformers 5.25 requires ``kernels`` and raises in every default from_pretrained without it;
    the pack's use_kernels=False loads anyway (older releases load regardless)."""
    from adatp_core.models.tiny_qwen import ensure_tiny_qwen3_5

    folder = ensure_tiny_qwen3_5(tmp_path)
    code = ("import sys; sys.modules['kernels'] = None  # find_spec says absent, import fails\n"
            "from adatp_core.models.loader import load_video_llm\n"
            "llm = load_video_llm(sys.argv[1], device='cpu', dtype='float32')\n"
            "from adatp_core.hf.kernels import kernels_line; print('loaded:', kernels_line(model=llm.model))")
    assert _run(code, folder, {}).startswith("loaded: gated delta rule: PyTorch")


def test_an_offline_fetch_on_cuda_falls_back_through_the_real_kernels_package(tmp_path):
    """The real transformers 5.25 + kernels code path with USE_HUB_KERNELS=1 and HF_HUB_OFFLINE=1 and an
    empty Hugging Face cache, kernelizing for CUDA on a CPU machine (the device capability faked):
    kernels raises ValueError for the first mapped layer; the pack puts the layers back, opens no
    connection, and the model still answers on the CPU."""
    if not HUB_BY_DEFAULT:
        pytest.skip(f"transformers {INSTALLED} kernelizes only on request; the pack's opt-in needs 5.25 or newer")
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("transformers 5.25's kernels package is not installed")
    from adatp_core.models.tiny_qwen import ensure_tiny_qwen3_5

    folder = ensure_tiny_qwen3_5(tmp_path / "model")
    code = ("import socket, sys, torch\n"
            "opened = []\n"
            "def refuse(self, address):\n    opened.append(address); raise OSError('no connection allowed')\n"
            "socket.socket.connect = refuse\n"
            "torch.cuda.get_device_capability = lambda device=None: (9, 0)\n"
            "from adatp_core.models.loader import load_video_llm\n"
            "from adatp_core.hf.kernels import load_hub_kernels, linear_attention_kernels\n"
            "llm = load_video_llm(sys.argv[1], device='cpu', dtype='float32')\n"
            "llm.model._kernels_device = 'cuda'  # kernelize as for a model on CUDA\n"
            "line = load_hub_kernels(llm.model, 'cuda')\n"
            "replaced = [n for n, m in llm.model.named_modules() if '_kernel_repo' in m.__dict__ or any("
            "'_kernel_repo' in f.__dict__ for f in m.__dict__.get('_kernel_funcs', {}).values())]\n"
            "ids = torch.tensor([[1, 2, 3]])\n"
            "with torch.no_grad():\n    llm.model(input_ids=ids)\n"
            "download = linear_attention_kernels('cpu', llm.model)['download']\n"
            "import json; print(json.dumps([opened, replaced, download, line]))")
    env = {"USE_HUB_KERNELS": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "KERNELS_CACHE": str(tmp_path / "kernels")}
    last = _run(code, folder, env)
    opened, replaced, download, line = json.loads(last) if last.startswith("[") else (None, None, None, last)
    assert (opened, replaced, download) == ([], [], "none"), line
    assert line.startswith("hub kernels could not be loaded (ValueError: ") and "offline mode" in line
    assert "unset USE_HUB_KERNELS" in line


def test_a_linear_attention_model_off_cuda_with_cuda_only_kernels_is_refused_before_loading(monkeypatch, tmp_path):
    """transformers 5.17/5.24 run fla / causal-conv1d on any device once they import; on the CPU that
    fails deep in Triton. The loader refuses it first, with what to do; the plain PyTorch code loads."""
    from adatp_core.errors import AdaTPEnvironmentError
    from adatp_core.models.loader import load_video_llm
    from adatp_core.models.tiny_qwen import ensure_tiny_qwen3_5

    folder = ensure_tiny_qwen3_5(tmp_path)
    fast = dict(lk.linear_attention_kernels("cpu"), gated_delta_rule="fla", cuda_only=True)
    monkeypatch.setattr(lk, "linear_attention_kernels", lambda *args, **kwargs: fast)
    with pytest.raises(AdaTPEnvironmentError, match="need CUDA.*Pick a CUDA device"):
        load_video_llm(folder, device="cpu", dtype="float32")
    monkeypatch.undo()
    assert load_video_llm(folder, device="cpu", dtype="float32").adapter.linear_attention
    assert "PyTorch" in lk.kernels_line(device_type="cpu")


def test_a_kernel_package_that_fails_to_import_does_not_refuse_the_cpu(tmp_path):
    """transformers tries ``import fla`` and runs its PyTorch code when that raises (fla installed
    without Triton: a CPU-only or macOS Python). The loader asks the imported transformers class,
    not find_spec, so such a Python loads on the CPU. An fla that imports is refused there by 5.17
    and 5.24 (they would run it on the CPU); 5.25 runs PyTorch for CPU inputs, so it loads."""
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
        results[kind] = _run(code, folder, {"PYTHONPATH": f"{tmp_path / kind}{os.pathsep}{ROOT}"})
    assert results["broken"] == "loaded"
    if HUB_BY_DEFAULT:
        assert results["working"] == "loaded"
    else:
        assert results["working"].startswith("refused") and "fla" in results["working"]
