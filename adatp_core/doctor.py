"""Self-check: does the pack work on this machine's device, in the dtype the user would use?

    python -m adatp_core doctor [--device cuda] [--dtype bfloat16] [--json]

It reports the environment (Python, torch and its CUDA/ROCm/MPS build, transformers,
PyAV, decord, bitsandbytes, the device, its capability and free memory, the SDPA
kernels it offers), then runs each built-in tiny model (LLaVA-OV, Qwen2.5-VL,
Qwen3-VL; random weights, built in code, nothing downloaded) on the device and
checks each fast path against the plain one:

- keep-all (retention 1) against transformers' own ``generate()``: the same greedy tokens;
- AdaTP in default decoding against static decoding: the same tokens;
- the static step's CUDA graph captured once and replayed for a second question;
- no cuDNN attention in any step (it builds a plan per new shape: 10x slower decoding);
- selection (steps 1, 3-5) with no host sync but Global Debias' one designed transfer
  (CUDA sync-debug mode, each sync located by the Python line that waited);
- two questions decoded together as 2 rows (the one step runner, the decode mode auto picks)
  against each answered alone: the same tokens;
- the prefill in chunks against one call, and layers >= K's keys and values on the host (staged on
  the device a layer at a time, the next one prefetched) against on the device: the same tokens;
- the batched Qwen vision attention against the stock tower;
- peak memory, time to first token and ms/token.

It ends with one table, one line per check: pass, fail or skip. A failure says what
fails and the setting that avoids it. The command line (cli.py) and the Self Check
node run ``run_doctor`` and show ``Report.text()``.

Greedy tokens are compared exactly, except that two paths may part at a near tie: when
the first differing step's two candidates are within the dtype's rounding of each
other in the logits (float32: 1e-3; 16-bit: 3% of the logit), the line passes and says so.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import os
import platform
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.overrides

from .attention import MIN_PREFILL_CHUNK, extract_attention
from .batching import decode_together
from .errors import AdaTPEnvironmentError, AdaTPInputError, AdaTPTransformersError, is_out_of_memory
from .generate import SamplingConfig, generate_answer
from .memory import free_memory, is_interrupt
from .hf import versions
from .hf.kernels import kernels_line_as_decided
from .models.loader import load_video_llm, resolve_device, resolve_dtype
from .runtime import VideoLLM
from .models.stock import stock_video_inputs
from .pipeline import PipelineConfig, select
from .prune import prune_tokens
from .sdpa import plan_free_attention
from .steps import CaptureStatus
from .timing import synchronize

log = logging.getLogger(__name__)

PASS, FAIL, SKIP = "pass", "fail", "skip"
QUESTION = "What is the red square doing in this video?"
# A second question of another prompt length that lands in the same static-decoding bucket.
OTHER_QUESTION = "Which colour is the disc, and where does it go after the cut?"
NEW_TOKENS = 8
ROWS_CHECK = "2 rows = one at a time"
CHUNKED_CHECK = "chunked prefill = one call"
KV_HOST_CHECK = "kv on host = on device"
LAYER = 2
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
AVOID_STATIC = ("set decode_mode=default (--decode-mode default; ComfyUI's auto mode falls back to it by itself "
                "when static decoding raises, but not when it chooses other tokens)")


@dataclass(frozen=True)
class Check:
    """One line of the table. detail: figures on a pass; on a failure, what fails and the
    setting that avoids it."""

    family: str
    name: str
    status: str
    detail: str = ""


@dataclass(frozen=True)
class Report:
    environment: dict
    checks: tuple[Check, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def table(self) -> str:
        """One line per check: family, check, result, detail."""
        fam = max((len(c.family) for c in self.checks), default=6)
        name = max((len(c.name) for c in self.checks), default=5)
        lines = [f"{'family':<{fam}}  {'check':<{name}}  result  detail"]
        lines += [f"{c.family:<{fam}}  {c.name:<{name}}  {c.status:<6}  {c.detail}" for c in self.checks]
        return "\n".join(lines)

    def summary(self) -> str:
        """The last line: the verdict and the counts; on a failure, what it means for the installed
        transformers (this command is the check to run after upgrading it)."""
        counts = Counter(c.status for c in self.checks)
        verdict = "all checks passed" if self.ok else "SOME CHECKS FAILED: see each failure's detail"
        line = f"{verdict} ({counts[PASS]} pass, {counts[FAIL]} fail, {counts[SKIP]} skip) in {self.seconds:.1f} s"
        if self.ok:
            return line
        return f"{line}. {upgrade_advice()}"

    def text(self) -> str:
        width = max(len(k) for k in self.environment)
        env = "\n".join(f"{k:<{width}}  {v}" for k, v in self.environment.items())
        return f"{env}\n\n{self.table()}\n\n{self.summary()}"

    def as_dict(self) -> dict:
        return {"ok": self.ok, "seconds": self.seconds, "environment": self.environment,
                "checks": [vars(c) for c in self.checks]}


def upgrade_advice(version: str | None = None) -> str:
    """What a failed self-check means for the installed transformers: `python -m adatp_core doctor`
    is the check to run after upgrading transformers, and the tested release is the way back."""
    version = version or versions.installed()
    kind = versions.support(version)
    back = (f"if the failures came with a transformers upgrade, install the newest tested release "
            f"({versions.install_command()}) and run it again"
            if kind != versions.TESTED else "failures here are the pack's or this installation's: report them "
                                            "with this report")
    return (f"`{versions.DOCTOR}` is the check to run after upgrading transformers; transformers {version} is "
            f"{versions.standing(version)}; {back}.")


# ----- environment ---------------------------------------------------------------------------
def _version(module: str, dist: str | None = None, load: bool = True) -> str:
    """A package's version, or why it is missing. load: import it (a broken install shows)."""
    try:
        if load:
            mod = importlib.import_module(module)
            return str(getattr(mod, "__version__", None) or importlib.metadata.version(dist or module))
        return importlib.metadata.version(dist or module)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
    except Exception as exc:  # an installed package that cannot load (missing native library, ...)
        if isinstance(exc, ImportError) and getattr(exc, "name", None) == module:
            return "not installed"
        return f"installed but cannot be imported ({type(exc).__name__}: {str(exc)[:120]})"


def _torch_build() -> str:
    if getattr(torch.version, "hip", None):
        return f"ROCm {torch.version.hip}"
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda}" + (f", cuDNN {torch.backends.cudnn.version()}"
                                               if torch.backends.cudnn.is_available() else "")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_built():
        return "MPS (Apple)"
    return "CPU only"


def _free_host_memory() -> str:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return f"{int(fields['MemAvailable'].split()[0]) / 2 ** 20:.1f} GiB free of " \
               f"{int(fields['MemTotal'].split()[0]) / 2 ** 20:.1f} GiB (host)"
    except (OSError, KeyError, ValueError):
        return "unknown"


def _device_lines(dev: torch.device) -> dict:
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        free, total = torch.cuda.mem_get_info(dev)
        arch = getattr(props, "gcnArchName", None) if getattr(torch.version, "hip", None) else None
        capability = arch or f"sm_{props.major}{props.minor}"
        return {"device": f"{dev} ({props.name}, {capability}, {props.multi_processor_count} SMs, "
                          f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'})",
                "free memory": f"{free / 2 ** 30:.1f} GiB free of {total / 2 ** 30:.1f} GiB"}
    if dev.type == "mps":
        return {"device": "mps (Apple GPU)", "free memory": _free_host_memory()}
    return {"device": f"{dev} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                      f"{torch.get_num_threads()} torch threads)", "free memory": _free_host_memory()}


SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def sdpa_backends(dev: torch.device, dtype: torch.dtype) -> dict[str, bool]:
    """Which SDPA kernels run on ``dev`` in ``dtype``: each one alone, on a small causal call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 4, 16, 64, device=dev, dtype=dtype)
    offered = {}
    for name in SDPA_BACKENDS:
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            offered[name] = False
            continue
        try:
            with warnings.catch_warnings(), sdpa_kernel([backend]), torch.inference_mode():
                warnings.simplefilter("ignore")
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
                synchronize(dev)
            offered[name] = True
        except RuntimeError:
            offered[name] = False
    return offered


def environment(dev: torch.device, dtype: torch.dtype) -> dict:
    env = {
        "python": f"{sys.version.split()[0]} ({platform.system()} {platform.machine()})",
        "torch": f"{torch.__version__} ({_torch_build()})",
        "transformers": _version("transformers"),
        "transformers tested": versions.describe(),
        "PyAV": _version("av"),
        "decord": _version("decord"),
        "bitsandbytes": _version("bitsandbytes", load=False),
        "Gated DeltaNet kernels": kernels_line_as_decided(dev.type),
        **_device_lines(dev),
        "dtype": str(dtype).removeprefix("torch."),
    }
    try:
        offered = sdpa_backends(dev, dtype)
        env["SDPA kernels"] = ", ".join(f"{n.split('_')[0].lower()} {'yes' if ok else 'no'}"
                                        for n, ok in offered.items())
    except Exception as exc:  # the environment report never stops the checks
        if is_interrupt(exc):
            raise
        env["SDPA kernels"] = f"unknown ({type(exc).__name__}: {str(exc)[:120]})"
    return env


# ----- spies ---------------------------------------------------------------------------------
class SdpaSpy(torch.overrides.TorchFunctionMode):
    """Counts the SDPA kernel that each ``scaled_dot_product_attention`` call runs with
    (``torch._fused_sdp_choice``: the choice SDPA itself makes, under the active
    ``sdpa_kernel`` context). Thread-local, like every torch function mode; calls captured
    into a CUDA graph are seen once, at capture."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.counts[self._choice(*args, **kwargs)] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _choice(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                **_) -> str:
        from torch.nn.attention import SDPBackend

        try:
            return SDPBackend(torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal,
                                                      scale=scale, enable_gqa=enable_gqa)).name
        except Exception:  # a device without a fused-kernel chooser (MPS, ...)
            return "unknown"


@contextlib.contextmanager
def sync_debug(mode: str):
    """Inside this block every CUDA host sync warns ("warn") or raises ("error")
    (torch.cuda.set_sync_debug_mode; copies to the host and .item() count, not
    torch.cuda.synchronize)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def selection_syncs(state, cfg: PipelineConfig):
    """(the selected state, where selection synchronised with the host: [(file, line)]),
    from CUDA's sync-debug warnings; the warnings name the Python line that waited."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sync_debug("warn"):
            selected = select(state, cfg)
    return selected, [(w.filename, w.lineno) for w in caught if "synchronizing" in str(w.message)]


def _designed_transfer(where: list) -> tuple[list, list]:
    """Split sync locations into Global Debias' one designed host transfer (its segment cuts
    and frame relevance: [2T-1] values that set the segments, which are host integers)
    and every other sync."""
    import inspect

    from . import debias

    lines, first = inspect.getsourcelines(debias.global_debias)
    home = os.path.normcase(os.path.abspath(debias.__file__))
    inside = [(f, n) for f, n in where
              if os.path.normcase(os.path.abspath(f)) == home and first <= n < first + len(lines)]
    return inside[:1], inside[1:] + [w for w in where if w not in inside]


# ----- comparisons ---------------------------------------------------------------------------
def tie_tolerance(dtype: torch.dtype, logit: float) -> float:
    """How far apart two logits may be and still be a tie after rounding in ``dtype``."""
    return 1e-3 if dtype == torch.float32 else 0.03 * max(1.0, abs(logit))


def compare_tokens(ours: tuple, ours_logits: torch.Tensor, theirs: tuple, theirs_logits: torch.Tensor | None,
                   dtype: torch.dtype) -> tuple[bool, str]:
    """Whether two greedy runs chose the same tokens (or parted at a near tie); a detail line.

    ours_logits: [steps, V] the logits that chose each of ``ours`` (and the EOS step, if any).
    """
    ours, theirs = list(ours), list(theirs)
    n = min(len(ours), len(theirs))
    first = next((i for i in range(n) if ours[i] != theirs[i]), None)
    error = ""
    if theirs_logits is not None:
        upto = first if first is not None else min(ours_logits.shape[0], theirs_logits.shape[0])
        if upto:
            err = (ours_logits[:upto].float() - theirs_logits[:upto].to(ours_logits).float()).abs().max().item()
            error = f", max logit difference {err:.2g}"
    if first is None and len(ours) == len(theirs):
        return True, f"{len(ours)} tokens equal{error}"
    step = first if first is not None else n
    if step >= ours_logits.shape[0]:
        return False, f"tokens differ after step {step} ({len(ours)} against {len(theirs)} tokens)"
    row = ours_logits[step].float()
    mine = int(row.argmax())
    other = theirs[step] if step < len(theirs) else (
        int(theirs_logits[step].argmax()) if theirs_logits is not None and step < theirs_logits.shape[0] else None)
    if other is None:
        return False, f"tokens differ at step {step}: one path stopped"
    gap = float(row[mine] - row[other])
    if gap <= tie_tolerance(dtype, float(row[mine])):
        return True, f"same tokens up to step {step}, where the two paths part at a near tie (logit gap {gap:.2g})"
    return False, f"tokens differ at step {step} (logit gap {gap:.3g}, beyond {str(dtype)[6:]} rounding)"


# ----- the checks ----------------------------------------------------------------------------
@dataclass
class _Family:
    label: str
    build: Callable
    name: str
    checks: list = field(default_factory=list)

    def add(self, name: str, status: str, detail: str = "") -> None:
        self.checks.append(Check(self.label, name, status, detail))


def families() -> dict[str, tuple[Callable, str]]:
    """The built-in tiny models: label -> (folder builder, model name)."""
    from .models.tiny import TINY_MODEL_NAME, ensure_tiny_model
    from .models import tiny_qwen as q

    return {"LLaVA-OV": (ensure_tiny_model, TINY_MODEL_NAME),
            "Qwen2.5-VL": (q.ensure_tiny_qwen2_5_vl, q.TINY_QWEN2_5_VL_NAME),
            "Qwen3-VL": (q.ensure_tiny_qwen3_vl, q.TINY_QWEN3_VL_NAME),
            "Qwen3.5": (q.ensure_tiny_qwen3_5, q.TINY_QWEN3_5_NAME),
            "Qwen3.5-MoE": (q.ensure_tiny_qwen3_5_moe, q.TINY_QWEN3_5_MOE_NAME),
            "Qwen3-VL-MoE": (q.ensure_tiny_qwen3_vl_moe, q.TINY_QWEN3_VL_MOE_NAME)}


def _frames() -> torch.Tensor:
    """Four 224x280 frames of two scenes (ComfyUI IMAGE, float 0..1)."""
    from .samples import scene_frames

    return torch.from_numpy(scene_frames(num_frames=4, width=280, height=224, scenes=2)).float() / 255


def _error(exc: BaseException) -> str:
    """An exception's type and first line, for a table line. transformers' own failure is shown as its
    original error: the versions and what to do are in the environment block and the last line."""
    if isinstance(exc, AdaTPTransformersError) and exc.__cause__ is not None:
        return f"{_error(exc.__cause__)}, inside transformers"
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"


def _stock_generate(llm: VideoLLM, state, frames, steps: int):
    """transformers' own greedy generate() on the full video: (tokens without EOS, logits [steps, V])."""
    prompt = state.prompt
    adapter = llm.adapter
    ids = prompt.input_ids[None].to(adapter.device)
    with torch.inference_mode(), plan_free_attention(adapter.device):
        out = llm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 **stock_video_inputs(llm, prompt, adapter.preprocess(frames, prompt.plan)),
                                 max_new_tokens=steps, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    eos = set(adapter.eos_token_ids)
    tokens = tuple(t for t in out.sequences[0, ids.shape[1]:].tolist() if t not in eos)
    return tokens, torch.cat(out.logits).float()


def _check_keep_all(fam: _Family, llm: VideoLLM, frames) -> None:
    name = "keep-all = stock generate()"
    state = prune_tokens(extract_attention(llm, frames, QUESTION, layer=LAYER), retention=1.0)
    ours = generate_answer(state, SamplingConfig(max_new_tokens=NEW_TOKENS, decode_mode="default"),
                           return_logits=True)
    tokens, logits = _stock_generate(llm, state, frames, NEW_TOKENS)
    ok, detail = compare_tokens(ours.token_ids, ours.logits, tokens, logits, llm.dtype)
    fam.add(name, PASS if ok else FAIL, detail if ok else
            f"{detail}: AdaTP's continuation from layer K departs from the stock model in this dtype on this "
            "device; dtype=float32 avoids rounding differences; if it persists, report it with this table")


def _answers(state, steps: int, mode: str):
    return generate_answer(state, SamplingConfig(max_new_tokens=steps, ignore_eos=True, decode_mode=mode),
                           return_logits=True)


def _check_static(fam: _Family, llm: VideoLLM, frames, dev: torch.device, spy: SdpaSpy) -> None:
    """Default against static decoding for two questions; the graph captured once, replayed for the
    second. What became of the graph is the step runner's ``CaptureStatus`` for each answer."""
    cfg = PipelineConfig()
    static_failed = None
    results, statuses = [], []
    for i, question in enumerate((QUESTION, OTHER_QUESTION)):
        # The first question's prefill, both decodings and the graph capture run under the SDPA spy.
        with spy if i == 0 else contextlib.nullcontext():
            state = select(extract_attention(llm, frames, question, layer=LAYER), cfg)
            default = _answers(state, NEW_TOKENS, "default")
            try:
                static = _answers(state, NEW_TOKENS, "static")
            except AdaTPEnvironmentError as exc:
                if is_out_of_memory(exc):
                    raise
                static_failed = str(exc)
                break
        results.append((default, static))
        statuses.append(llm.static_decoders.status)
    if static_failed is not None:
        fam.add("AdaTP default = static decoding", FAIL, static_failed[:400])  # it names decode_mode=default
        fam.add("static graph reused", SKIP, "static decoding failed (line above)")
        return
    details = []
    for default, static in results:
        ok, detail = compare_tokens(static.token_ids, static.logits, default.token_ids, default.logits, llm.dtype)
        details.append((ok, detail))
    ok = all(d[0] for d in details)
    fam.add("AdaTP default = static decoding", PASS if ok else FAIL,
            "; ".join(f"question {i + 1}: {d}" for i, (_, d) in enumerate(details))
            + ("" if ok else f": static decoding chooses other tokens on this device; {AVOID_STATIC}"))
    none = CaptureStatus("skipped", "no static decoder was kept")  # cannot happen short of a cleared store
    first, second = (s or none for s in statuses)
    failed = [s for s in (first, second) if s.failed]
    reused = len(llm.static_decoders) == 1
    if failed:
        fam.add("static graph reused", FAIL, f"CUDA graph capture failed ({failed[0].reason[:300]}): decoding is "
                                             f"correct but not faster; {AVOID_STATIC}")
    elif first.outcome == "captured" and second.outcome == "reused" and reused:
        fam.add("static graph reused", PASS, f"captured once ({1000 * first.seconds:.0f} ms), replayed for a second "
                                             f"question with no new capture")
    elif first.outcome == second.outcome == "skipped" and reused:
        why = f"no CUDA graphs on {dev.type}" if dev.type != "cuda" else f"no CUDA graph ({first.reason})"
        fam.add("static graph reused", SKIP, f"{why}: static steps run without a graph "
                                             f"(the second question reused the first one's buffers)")
    else:
        fam.add("static graph reused", FAIL, f"graph {first.note}, then {second.note}; "
                                             f"{len(llm.static_decoders)} decoder(s): the buffers or graph were "
                                             f"not reused across questions; {AVOID_STATIC}")


def _check_sdpa(fam: _Family, spy: SdpaSpy, dev: torch.device) -> None:
    counts = dict(spy.counts)
    seen = ", ".join(f"{k.split('_')[0].lower()} {v}" for k, v in sorted(counts.items())) or "no SDPA call"
    if counts.get("CUDNN_ATTENTION"):
        fam.add("no cuDNN attention", FAIL,
                f"cuDNN attention ran ({seen}): it builds a plan per new shape, so decoding is many times "
                "slower; set attention=flash_attention_2 in Load Video LLM (or --attention) to avoid SDPA")
    elif counts and set(counts) == {"unknown"}:
        fam.add("no cuDNN attention", SKIP, f"torch cannot say which SDPA kernel runs on {dev.type} ({seen})")
    else:
        fam.add("no cuDNN attention", PASS, f"SDPA kernels in prefill and both decode modes: {seen}")


def _check_selection_and_figures(fam: _Family, llm: VideoLLM, frames, dev: torch.device) -> None:
    """Selection under CUDA sync-debug "error"; then the figures of one warm AdaTP answer."""
    cfg = PipelineConfig()
    state = extract_attention(llm, frames, OTHER_QUESTION, layer=LAYER)
    if dev.type != "cuda":
        fam.add("selection without host sync", SKIP, f"no host sync to detect on {dev.type}")
        selected = select(state, cfg)
    else:
        selected, where = selection_syncs(state, cfg)
        designed, others = _designed_transfer(where)
        if others:
            places = ", ".join(f"{os.path.basename(f)}:{n}" for f, n in others[:6])
            fam.add("selection without host sync", FAIL,
                    f"selection waits for the GPU {len(others)} time(s) ({places}): answers are right but "
                    "selection is slower; no setting avoids it: report it with this table")
        else:
            fam.add("selection without host sync", PASS,
                    "global debias, local debias and pruning under CUDA sync-debug mode: no host sync"
                    + (" besides global debias' one designed transfer (segment cuts and frame relevance)"
                       if designed else ""))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    answer = generate_answer(selected, SamplingConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    s = answer.stats
    memory = (f"peak {torch.cuda.max_memory_allocated(dev) / 2 ** 20:.0f} MiB" if dev.type == "cuda"
              else f"process peak RSS {_peak_rss_mib():.0f} MiB")
    fam.add("figures", PASS, f"{memory}; TTFT {1000 * s['time_to_first_token']:.1f} ms, "
                             f"selection {1000 * s['time_selection']:.2f} ms; "
                             f"{s['decode_ms_per_token']:.2f} ms/token ({s['decode_mode']} decoding, "
                             f"{s['new_tokens']} tokens, {s['tokens_kept']} of {s['tokens_total']} visual tokens)")


def _peak_rss_mib() -> float:
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024
    except (ImportError, OSError):
        return float("nan")


def _check_rows(fam: _Family, llm: VideoLLM, frames) -> None:
    """Two questions decoded together as 2 rows (the step runner, in the mode auto picks here), against
    each answered alone: the same tokens (or parted at a near tie)."""
    cfg = PipelineConfig()
    states = [select(extract_attention(llm, frames, q, layer=LAYER), cfg) for q in (QUESTION, OTHER_QUESTION)]
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    alone = [generate_answer(s, sampling, return_logits=True) for s in states]
    done = {f.key: f for f in decode_together(llm, sampling, [(i, lambda s=s: s) for i, s in enumerate(states)], 2)}
    failed = [f.error for f in done.values() if f.error is not None]
    if failed:
        fam.add(ROWS_CHECK, FAIL, f"a row failed ({failed[0][:300]}); batch_size 1 (--batch-size 1) avoids it")
        return
    results = [compare_tokens(a.token_ids, a.logits, done[i].answer.token_ids, None, llm.dtype)
               for i, a in enumerate(alone)]
    modes = "+".join(sorted({done[i].answer.stats["decode_mode"] for i in done}))
    ok = all(r[0] for r in results)
    fam.add(ROWS_CHECK, PASS if ok else FAIL,
            f"{modes} steps; " + "; ".join(f"question {i + 1}: {d}" for i, (_, d) in enumerate(results))
            + ("" if ok else ": rows decoded together choose other tokens than one answer at a time on this "
                             "device; batch_size 1 (--batch-size 1) avoids it"))


def _check_chunked(fam: _Family, llm: VideoLLM, frames) -> None:
    """The prefill in calls of MIN_PREFILL_CHUNK tokens against one call: every call after the first
    attends over the cache through hf/attention_hook.TailCausal (on CUDA, flash attention with a
    bottom-right causal mask where torch allows it; blocks of sdpa elsewhere), a path the CPU suite
    cannot see on a GPU. The same kept tokens and the same greedy answer (or parted at a near tie)."""
    cfg, sampling = PipelineConfig(), SamplingConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    one, chunked = (select(extract_attention(llm, frames, QUESTION, layer=LAYER, reuse_prefix=False,
                                             prefill_chunk=chunk), cfg) for chunk in (0, MIN_PREFILL_CHUNK))
    calls = chunked.stats.get("prefill_calls", 0)
    same_keep = torch.equal(one.keep.cpu(), chunked.keep.cpu())
    a, b = (generate_answer(s, sampling, return_logits=True) for s in (one, chunked))
    ok, detail = compare_tokens(a.token_ids, a.logits, b.token_ids, b.logits, llm.dtype)
    ok = ok and same_keep and calls > 1
    fam.add(CHUNKED_CHECK, PASS if ok else FAIL,
            f"{calls} calls of {MIN_PREFILL_CHUNK} tokens; keep set {'the same' if same_keep else 'DIFFERS'}; {detail}"
            + ("" if ok else ": the chunked prefill differs from one call on this device; --prefill-chunk 0 "
                             "(Extract Attention's prefill_chunk 0) runs the prompt in one call"))


def _check_kv_on_host(fam: _Family, llm: VideoLLM, frames) -> None:
    """Layers >= K's keys and values on the host against on the device (generate_answer's kv), over a
    continuation from K in calls of MIN_PREFILL_CHUNK tokens: each layer staged on the device while it
    runs, the next one prefetched (on CUDA on a side stream, whose ordering the CPU suite cannot see).
    The same greedy answer (or parted at a near tie). K is the smallest this model takes, so that more
    layers live on the host than the two slots hold (they are then copied at every step)."""
    layer = min(k for k in llm.adapter.valid_layers() if k)
    state = select(extract_attention(llm, frames, QUESTION, layer=layer, reuse_prefix=False,
                                     prefill_chunk=MIN_PREFILL_CHUNK), PipelineConfig())
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True, decode_mode="default")
    device, host = (generate_answer(state, sampling, return_logits=True, kv=kv) for kv in ("device", "host"))
    ok, detail = compare_tokens(device.token_ids, device.logits, host.token_ids, host.logits, llm.dtype)
    ok = ok and host.stats.get("kv_on") == "host"
    fam.add(KV_HOST_CHECK, PASS if ok else FAIL,
            f"K={layer}, kept tokens from K in calls of {MIN_PREFILL_CHUNK}; {detail}"
            + ("" if ok else ": keys and values on the host differ from on the device here; kv=device "
                             "(the default auto keeps them on the device while it has room) avoids it"))


def _check_vision(fam: _Family, llm: VideoLLM, frames) -> None:
    """Qwen: the batched vision attention (hf/vision.py) against the stock tower."""
    from .hf.vision import vision_forward

    adapter = llm.adapter
    plan = adapter.plan_video(*(int(x) for x in frames.shape[:3]))
    with torch.inference_mode(), plan_free_attention(adapter.device):
        pixels = adapter.preprocess(frames, plan).type(adapter.visual.dtype)
        grid = adapter.grid_thw(plan)
        stock = adapter.visual(pixels, grid_thw=grid).pooler_output.float()
        try:
            batched = vision_forward(adapter.visual, pixels, grid).pooler_output.float()
        except Exception as exc:
            if is_interrupt(exc):
                raise
            fam.add("batched vision = stock tower", FAIL,
                    f"the batched vision attention raised ({_error(exc)}); the pack falls back to the stock "
                    "tower by itself (slower vision, same answers): nothing to set")
            return
    err = (batched - stock).abs().max().item() / max(stock.abs().max().item(), 1e-6)
    tol = 1e-4 if llm.dtype == torch.float32 else 3e-2
    status = PASS if err <= tol else FAIL
    fam.add("batched vision = stock tower", status, f"max relative difference {err:.2g} (tolerance {tol:g})"
            + ("" if status == PASS else ": the batched vision attention is wrong on this device; "
               "report it with this table (no setting avoids it)"))


def _run_family(fam: _Family, dev: torch.device, dtype: torch.dtype, frames, on_check) -> None:
    try:
        llm = load_video_llm(fam.build(), device=dev, dtype=dtype, name=fam.name)
    except Exception as exc:
        if is_interrupt(exc):
            raise
        advice = "" if isinstance(exc, (AdaTPEnvironmentError, AdaTPInputError)) else "; try --dtype float32"
        fam.add("load", FAIL, f"the built-in tiny model does not load ({_error(exc)}){advice}")
        return
    spy = SdpaSpy()
    steps = [lambda: _check_keep_all(fam, llm, frames),
             lambda: _check_static(fam, llm, frames, dev, spy),
             lambda: _check_sdpa(fam, spy, dev),
             lambda: _check_selection_and_figures(fam, llm, frames, dev),
             lambda: _check_rows(fam, llm, frames),
             lambda: _check_chunked(fam, llm, frames),
             lambda: _check_kv_on_host(fam, llm, frames)]
    if hasattr(llm.adapter, "grid_thw"):
        steps.append(lambda: _check_vision(fam, llm, frames))
    names = ("keep-all = stock generate()", "AdaTP default = static decoding", "no cuDNN attention",
             "figures", ROWS_CHECK, CHUNKED_CHECK, KV_HOST_CHECK, "batched vision = stock tower")
    try:
        for name, step in zip(names, steps):
            done = len(fam.checks)
            try:
                step()
            except Exception as exc:
                if is_interrupt(exc):
                    raise
                log.debug("%s: %s failed", fam.label, name, exc_info=True)
                if len(fam.checks) == done:
                    fam.add(name, FAIL, f"raised {_error(exc)}"
                            + ("; use fewer frames or a smaller model" if is_out_of_memory(exc) else ""))
            if on_check is not None:
                on_check(fam.checks[-1])
        for key, reason in llm.adapter.fallbacks.items():
            fam.add("no fallback taken", FAIL, f"{key}: {reason}")
    finally:
        del llm
        free_memory()


def run_doctor(device="auto", dtype="auto", only: tuple[str, ...] | None = None,
               on_check: Callable[[Check], None] | None = None) -> Report:
    """Run every check on ``device`` in ``dtype`` ("auto": what Load Video LLM would pick).

    only: family labels to run, any case (default: every built-in tiny model).
    on_check(check) is called after each check; it may raise (an interrupt) to stop.
    Raises AdaTPInputError / AdaTPEnvironmentError for a device or dtype that cannot be used.
    """
    start = time.perf_counter()
    if dtype not in DTYPE_CHOICES and not isinstance(dtype, torch.dtype):
        raise AdaTPInputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    env = environment(dev, torch_dtype)
    table = families()
    # a label (LLaVA-OV) or the model_type the README's family table names (llava_onevision)
    aliases = {"llava_onevision": "llava-ov", "qwen2_5_vl": "qwen2.5-vl", "qwen3_vl": "qwen3-vl",
               "qwen3_5": "qwen3.5", "qwen3_5_moe": "qwen3.5-moe", "qwen3_vl_moe": "qwen3-vl-moe"}
    wanted = ({aliases.get(f.lower(), f.lower()) for f in only} if only
              else {label.lower() for label in table})
    unknown = sorted(wanted - {label.lower() for label in table})
    if unknown:
        raise AdaTPInputError(f"unknown model families {unknown}; use some of {', '.join(table)} "
                              f"(or {', '.join(aliases)})")
    frames = _frames()
    checks: list[Check] = []
    for label, (build, name) in table.items():
        if label.lower() not in wanted:
            continue
        fam = _Family(label, build, name)
        _run_family(fam, dev, torch_dtype, frames, on_check)
        checks += fam.checks
    return Report(environment=env, checks=tuple(checks), seconds=time.perf_counter() - start)


def main(argv=None) -> int:
    """``python -m adatp_core doctor``: exit status 0 when every check passes (or is skipped),
    1 when one fails, 2 when the device or dtype cannot be used."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m adatp_core doctor",
                                description="Check that the pack works on this machine (downloads nothing).")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto: what Load Video LLM picks on the device (bfloat16 or float16 on CUDA)")
    p.add_argument("--family", action="append", metavar="NAME",
                   help="check only this built-in family (LLaVA-OV, Qwen2.5-VL, Qwen3-VL, Qwen3.5, Qwen3.5-MoE, "
                        "Qwen3-VL-MoE); repeatable")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # this process's output is the report
    try:
        report = run_doctor(args.device, args.dtype, only=tuple(args.family or ()) or None)
    except (AdaTPInputError, AdaTPEnvironmentError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.text())
    return 0 if report.ok else 1

