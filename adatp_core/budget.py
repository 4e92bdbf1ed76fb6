"""What a run's frames will take in memory, against what this machine has, known before decoding.

A video's sampling plan (video.SamplePlan: frame count and decoded size, from the
probe alone) says what its frames will take: the decoded uint8 frames
[T, H, W, 3], the IMAGE that nodes return ([T, H, W, 3] float32, 4 bytes a
channel) and, with a model, the model's pixel input and prompt embeddings on
its device. ``check_memory`` refuses a run whose estimate is above a share of
the memory available now, with the estimate and the number of frames that
would fit, before anything is decoded (docs: README, "What frames cost").

The estimate is a floor: the model's own working memory (activations, the KV
cache) comes on top of it; the shares leave room for that.

Torch-free at import: decode workers import video.py, which uses this module.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import AdaTPInputError

# A run may plan to take at most this share of the memory available when it starts
# (the rest: the model's working memory, ComfyUI and other nodes' outputs, the OS).
HOST_MEMORY_SHARE = 0.75
DEVICE_MEMORY_SHARE = 0.9
IMAGE_BYTES_PER_CHANNEL = 4  # ComfyUI's IMAGE is float32
GB = 1e9


def frames_bytes(count: int, width: int, height: int) -> tuple[int, int]:
    """(decoded uint8 frames, IMAGE float32 frames) bytes of ``count`` frames of width x height."""
    pixels = int(count) * int(width) * int(height) * 3
    return pixels, pixels * IMAGE_BYTES_PER_CHANNEL


def available_host_bytes() -> int | None:
    """Memory this machine can give a new allocation now without swapping: psutil's
    ``available`` when psutil is installed (ComfyUI ships it), else Linux's MemAvailable,
    else free pages from ``os.sysconf``; None when none of these answers."""
    try:
        import psutil  # optional
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return int(psutil.virtual_memory().available)
        except (OSError, RuntimeError, AttributeError):
            pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def available_device_bytes(device) -> int | None:
    """Free memory on a CUDA ``device`` (a torch.device) now, plus what torch's caching
    allocator holds unused, within the process's cap where one is set
    (torch.cuda.set_per_process_memory_fraction: the bench's 24 GB on a larger card); None for
    other devices (the host's memory is counted instead)."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch  # a torch device was given, so torch is loaded; workers never get here

    try:
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        cached = torch.cuda.memory_reserved(device) - allocated
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch 2.6 on
        allowed = int(fraction(device) * total) if fraction is not None else int(total)
    except (RuntimeError, AssertionError):
        return None
    return max(min(int(free) + max(int(cached), 0), allowed - int(allocated)), 0)


@dataclass(frozen=True)
class MemoryEstimate:
    """What a run will take, in bytes, before anything is decoded.

    parts: (what, bytes, where) with where "host" or a device name: what grows with the frames.
    frames: the frame count the parts are for (to say how many would fit).
    fixed: parts of the same form that do not grow with the frames (one chunk's working memory).
    resident: parts already in memory (the model's weights): in the peak, not in what is still needed.
    """

    parts: tuple[tuple[str, int, str], ...]
    frames: int
    fixed: tuple[tuple[str, int, str], ...] = ()
    resident: tuple[tuple[str, int, str], ...] = ()

    def bytes_on(self, where: str) -> int:
        """What the run still has to allocate on ``where``."""
        return sum(b for _, b, w in self.parts + self.fixed if w == where)

    def fixed_on(self, where: str) -> int:
        return sum(b for _, b, w in self.fixed if w == where)

    def peak_on(self, where: str) -> int:
        """The run's peak on ``where``: what it allocates and what is there already."""
        return self.bytes_on(where) + sum(b for _, b, w in self.resident if w == where)

    def places(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(w for _, _, w in self.parts + self.fixed + self.resident))

    def describe(self, where: str) -> str:
        return ", ".join(f"{what} {size_text(b)}" for what, b, w in self.parts + self.fixed if w == where)

    def figures(self) -> dict:
        """For stats: planned bytes per place (and the planned peak, with the weights), in MB."""
        out = {}
        for w in self.places():
            place = w.replace(":", "")
            out[f"memory_planned_{place}_mb"] = round(self.bytes_on(w) / 1e6, 1)
            if self.resident or self.fixed:
                out[f"memory_planned_peak_{place}_mb"] = round(self.peak_on(w) / 1e6, 1)
        return out

    def breakdown(self) -> dict:
        """For stats: each part of the planned peak in MB, by place ("where the memory goes")."""
        return {w: {what: round(b / 1e6, 1) for what, b, place in self.resident + self.parts + self.fixed
                    if place == w} for w in self.places()}


def check_memory(estimate: MemoryEstimate, name: str, available=None,
                 advice: str = " (num_frames, --frames)") -> None:
    """Refuse (AdaTPInputError) a run whose estimate on any place is above that place's share
    of the memory available now. available(where) -> bytes or None (unknown: not checked);
    by default the host's (``available_host_bytes``) and, for a CUDA place, that device's.
    advice: what else to change, after "Sample fewer frames"."""
    for where in estimate.places():
        need = estimate.bytes_on(where)
        have = (available or available_bytes)(where)
        if have is None or need == 0:
            continue
        share = HOST_MEMORY_SHARE if where == "host" else DEVICE_MEMORY_SHARE
        limit = int(have * share)
        if need <= limit:
            continue
        fixed = estimate.fixed_on(where)
        per_frame = (need - fixed) / max(estimate.frames, 1)
        fit = max(int(math.floor((limit - fixed) / per_frame)), 0) if per_frame else 0
        memory = "host memory" if where == "host" else f"memory on {where}"
        fits = (f"about {fit} frame(s) would fit" if fit else "not even one frame fits")
        peak = estimate.peak_on(where)
        loaded = (f"; the run's peak would be about {size_text(peak)} with the {size_text(peak - need)} "
                  "already loaded" if peak > need else "")
        raise AdaTPInputError(
            f"{name}: {estimate.frames} frame(s) would need about {size_text(need)} of {memory} "
            f"({estimate.describe(where)}), more than the {100 * share:.0f}% of the {size_text(have)} "
            f"available now that a run may take{loaded}; {fits}. Sample fewer frames{advice}, or free memory; "
            "nothing was decoded.")


def size_text(num_bytes: float) -> str:
    """'2.36 MB', '16.11 GB'."""
    return f"{num_bytes / GB:.2f} GB" if num_bytes >= GB else f"{num_bytes / 1e6:.2f} MB"


def available_bytes(where: str) -> int | None:
    """What a place ("host" or a device's name) can give a new allocation now: available_host_bytes or
    place_available_bytes; check_memory's default."""
    return available_host_bytes() if where == "host" else place_available_bytes(where)


def place_available_bytes(where: str) -> int | None:
    """available_device_bytes of a device place's name ("cuda:0"); None where unknown."""
    import torch  # a device place comes only from a model, so torch is loaded

    try:
        device = torch.device(where)
    except (RuntimeError, TypeError):
        return None
    return available_device_bytes(device)


# -- the run's peak, before any work (issue 30, item 7) ------------------------------------------

# Query rows the scores at layer K-1 take, when the question's length is not known (an estimate).
SCORED_ROWS = 64
# A prefill call over a non-empty cache runs its queries in blocks whose additive mask [rows, past + n]
# takes at most TAIL_MASK_BYTES, at least MIN_TAIL_ROWS rows at a time (hf/attention_hook.TailCausal).
# Short blocks cost time: each re-reads every key, and splits the CPU kernel's query tiles. 8 heads over
# 4 KV heads of 128, 2048 queries over 32k keys, float32, 2 cores: 130 rows (16 MiB) 2.66 s, 523 rows
# (64 MiB) 2.03 s, 1047 rows (128 MiB) 1.65 s, the dense [n, L] mask 1.76 s (and 256 MiB of mask).
TAIL_MASK_BYTES = 64 << 20
MIN_TAIL_ROWS = 32


def tail_mask_rows(n: int, width: int, item: int, mask_bytes: int | None = None) -> int:
    """Query rows per block of a call of n tokens over ``width`` keys, for a mask of ``item`` bytes an
    element within ``mask_bytes`` (default TAIL_MASK_BYTES)."""
    budget = TAIL_MASK_BYTES if mask_bytes is None else mask_bytes
    return min(n, max(MIN_TAIL_ROWS, budget // (width * item)))


def tail_copies_keys(where: str, item: int, head_dim: int) -> bool:
    """Whether a call over a non-empty cache on ``where`` copies a layer's keys and values per query head
    (hf/attention_hook.TailCausal.attend): not on the CPU (sdpa shares a group's keys there), nor where
    CUDA's flash attention takes the call (half precision, heads of at most 256, Ampere or later, not
    ROCm); elsewhere (float32, MPS, a T4 or V100) the kernel that takes a mask needs them copied."""
    if where == "host" or where.startswith("cpu"):
        return False
    if not where.startswith("cuda") or item != 2 or head_dim > 256:
        return True
    import torch  # lazy: this module stays torch-free at import (decode workers)

    if torch.version.hip:
        return True
    try:
        return torch.cuda.is_available() and torch.cuda.get_device_capability(where) < (8, 0)
    except (RuntimeError, AssertionError, ValueError):
        return False  # no such card here (a model of another machine): as on the cards the bench models


def prefill_parts(length: int, attention_layers: int, kv_heads: int, head_dim: int, heads: int, d_model: int,
                  inner: int, chunk: int, item: int, where: str, scored: bool = True) -> tuple:
    """What the prefill of layers < K holds at its peak on ``where``, for a prompt of ``length`` tokens in
    calls of ``chunk`` (0: one call): ((what, bytes, where), ...), run_memory's model of the prefill:
    - layers < K's keys and values for every token (``attention_layers`` of them; linear-attention
      layers hold a fixed state, counted elsewhere);
    - layer K's input rows [L, D] (with the prompt's embeddings beside them when one call takes it all);
    - one call's working memory: its hidden states and MLP activations (``inner`` wide), and for a call
      over a non-empty cache its blocked causal mask (``tail_mask_rows`` x L) and, where the kernel
      needs them (``tail_copies_keys``), one layer's keys and values copied per query head;
    - the scores at layer K-1 (``scored``): one KV group's float32 logits and probabilities
      [heads / kv_heads x SCORED_ROWS x L] at a time.
    An estimate from the shapes, not a measurement (bench/long_video.py measures)."""
    c = min(chunk or length, length)
    group = max(heads // max(kv_heads, 1), 1)
    working = c * (6 * d_model + 3 * inner) * item
    if c < length:  # every call after the first attends to a non-empty cache
        working += tail_mask_rows(c, length, item) * length * item
        if heads > kv_heads and tail_copies_keys(where, item, head_dim):  # one layer's at a time
            working += 2 * heads * head_dim * length * item
    scores = 2 * group * SCORED_ROWS * length * 4 if scored else 0
    rows = (1 if c < length else 2) * length * d_model * item
    return ((f"layers < K's keys and values ({attention_layers} layers x {length} tokens)",
             attention_layers * 2 * kv_heads * head_dim * length * item, where),
            (f"layer K's input rows [{length}, {d_model}]" if c < length else
             f"the prompt's embeddings and layer K's input rows [2 x {length}, {d_model}]", rows, where),
            (f"one prefill call's activations ({c} tokens)", working, where),
            (f"the scores' rows [{group} x {SCORED_ROWS} x {length}] float32, one KV group at a time", scores, where))


def mlp_width(llm) -> int:
    """The widest MLP activation one token takes in ``llm`` (flops.LLMShape): dense, or a MoE's experts."""
    return max(llm.intermediate, llm.moe.top_k * llm.moe.intermediate if llm.moe is not None else 0)


def pinned_bytes(nbytes: int, where: str) -> int:
    """What a host buffer of ``nbytes`` takes when it is pinned for a GPU at ``where`` (a CUDA device):
    torch's caching host allocator rounds each block up to a power of two; unpinned (``where`` the host):
    ``nbytes``."""
    if not where.startswith("cuda") or nbytes <= 0:
        return int(nbytes)
    return 1 << (int(nbytes) - 1).bit_length()


# Host-homed layers' staged copies on the device at once: the layer that runs and the next, prefetched
# (hf/cache.StagedCopies.SLOTS is this).
STAGED_LAYERS = 2


def continuation_parts(llm, layer: int, prompt_tokens: int, kept_tokens: int, reserve: int, chunk: int, item: int,
                       where: str, kv_on_host: bool = False) -> tuple:
    """What the continuation from layer K allocates for one answer, ((what, bytes, where), ...), for
    ``llm`` (flops.LLMShape) continuing ``kept_tokens`` (the kept visual tokens and the text) in calls of
    ``chunk`` (0: one call), with room for ``reserve`` new tokens, one model for the answer's placement
    (places.plan_places, when the answer starts) and for run_memory's answer side:
    - its copy of layers < K's keys and values (``prompt_tokens`` each: decode.continue_prefill copies the
      state's, which the state keeps for its next answers);
    - layers >= K's keys and values (the kept tokens and the answer), on ``where``, or with
      ``kv_on_host`` on the host, STAGED_LAYERS layers' staged copies on ``where`` (hf/cache.StagedCopies);
    - one call's working memory (``prefill_parts``' over the kept tokens), last.
    An estimate from the shapes, not a measurement."""
    per_token = 2 * llm.kv_heads * llm.head_dim * item
    full = llm.full_attention_layers()
    below = sum(1 for i in full if i < layer)
    above = len(full) - below
    n = kept_tokens + reserve
    one_call = prefill_parts(kept_tokens, 0, llm.kv_heads, llm.head_dim, llm.heads, llm.hidden, mlp_width(llm),
                             chunk, item, where, scored=False)[2]
    parts = [(f"the answer's copy of layers < K's keys and values ({below} layers x {prompt_tokens} tokens)",
              below * prompt_tokens * per_token, where)]
    if above:
        home = above * 2 * pinned_bytes(n * per_token // 2, where) if kv_on_host else above * n * per_token
        parts.append((f"layers >= K's keys and values ({above} layers x {n} tokens"
                      + (", pinned blocks" if home > above * n * per_token else "") + ")", home,
                      "host" if kv_on_host else where))
        if kv_on_host:
            staged = min(above, STAGED_LAYERS)
            parts.append((f"{staged} layers' staged copies of them ({staged} x {n} tokens)",
                          staged * n * per_token, where))
    return (*parts, one_call)


@dataclass(frozen=True)
class RunPlan:
    """What a run's peak memory depends on, known from the sampling plan and the prompt alone.

    llm: flops.LLMShape of the text model; vision: flops.VisionShape of the vision side, per frame
        (LLaVA-OV) or per temporal patch (Qwen; ``frames_per_step`` 2).
    frames, decoded: the sampled frames and their decoded (width, height).
    pixels: (height, width) of the model's input frames.
    prompt_tokens (L), visual_tokens (N): of the longest prompt; injections: Qwen3-VL's DeepStack
        rows per visual token (0 elsewhere).
    layer: K; retention: R (None: no pruning, every token goes on through every layer).
    streamed: frames decoded a chunk at a time (streaming.py) rather than held as one IMAGE.
    chunk_frames: frames per vision chunk; prefill_chunk: tokens per prefill call (0: one call).
    item: bytes per element of the model's dtype; where: the model's place ("host" or a device).
    weights: bytes of the model's weights there (already loaded).
    The three placements (places.plan_places decides them from this plan):
    encoded_on_host: the encoded rows and DeepStack's wait on the host; one prefill call's span of them is
        on ``where`` at a time.
    rows_on_host: layer K's input rows [L, D] wait on the host (the prompt's embeddings of a call stay on
        ``where``); only the kept ones come back.
    kv_on_host: layers >= K's keys and values live on the host while answering, STAGED_LAYERS layers'
        staged copies on ``where`` (hf/cache.StagedCopies).
    retention None: the stock model (every layer holds every token once, no copy: bench/long_video.py's
    stock column); AdaTP without pruning is retention 1.0.
    """

    llm: object
    vision: object
    frames: int
    decoded: tuple[int, int]
    pixels: tuple[int, int]
    prompt_tokens: int
    visual_tokens: int
    layer: int
    retention: float | None = None
    streamed: bool = False
    chunk_frames: int = 16
    prefill_chunk: int = 0
    frames_per_step: int = 1
    injections: int = 0
    max_new_tokens: int = 0
    item: int = 2
    where: str = "host"
    weights: int = 0
    encoded_on_host: bool = False
    rows_on_host: bool = False
    kv_on_host: bool = False


def run_memory(run: RunPlan) -> MemoryEstimate:
    """The run's peak, part by part, before any work: the weights (loaded), the frames (all of them
    as an IMAGE, or one chunk when streamed), one chunk's pixels and vision working memory, the encoded
    rows of every visual token, the prompt's embeddings and layer K's input rows [L, D], layers < K's
    keys and values for every token, one prefill call's working memory, and the answer's side
    (``continuation_parts``: its copy of layers < K's keys and values, layers >= K's for the R·N kept
    tokens, the text and the answer; its one call over the kept tokens is smaller than the prefill's and
    comes after it). Shapes only: an estimate, not a measurement (bench/long_video.py compares)."""
    llm, vis, item, where = run.llm, run.vision, run.item, run.where
    width, height = run.decoded
    h, w = run.pixels
    frames = int(run.frames)
    chunk = min(max(int(run.chunk_frames), 1), frames)
    steps_chunk = -(-chunk // run.frames_per_step)
    decoded_chunk, _ = frames_bytes(chunk, width, height)
    # one chunk's pixels: float32 frames, then the model's input in its dtype (Qwen: padded to whole steps)
    pixels_chunk = steps_chunk * run.frames_per_step * 3 * h * w * (4 + item)
    patches = steps_chunk * vis.patches
    vision_chunk = patches * (6 * vis.hidden + vis.mlp_matrices * vis.intermediate) * item
    length, n = int(run.prompt_tokens), int(run.visual_tokens)
    d = llm.hidden
    full = llm.full_attention_layers()
    stock = run.retention is None  # nothing is pruned, and every layer holds every token once
    below = len(full) if stock else sum(1 for i in full if i < run.layer)
    kept = n if stock else int(round(n * run.retention))
    kv_below, rows, one_call, scores = prefill_parts(length, below, llm.kv_heads, llm.head_dim, llm.heads, d,
                                                    mlp_width(llm), run.prefill_chunk, item, where,
                                                    scored=bool(run.layer))
    state = 0
    if llm.linear is not None:
        conv, recurrent = llm.linear.state_elements()
        state = (llm.layers - len(full)) * (conv * item + recurrent * 4)
    parts, fixed = [], []
    if run.streamed:
        fixed.append((f"one chunk of decoded frames [{chunk}, {height}, {width}, 3] uint8", decoded_chunk, "host"))
    else:
        decoded, image = frames_bytes(frames, width, height)
        parts += [(f"decoded frames [{frames}, {height}, {width}, 3] uint8", decoded, "host"),
                  (f"the IMAGE [{frames}, {height}, {width}, 3] float32", image, "host")]
    fixed += [(f"one chunk's pixels [{steps_chunk * run.frames_per_step}, 3, {h}, {w}]", pixels_chunk, where),
              (f"the vision tower over one chunk ({patches} patches)", vision_chunk, where)]
    encoded = (f"the encoded rows [{n}, {d}]" + (f" and {run.injections} DeepStack rows each" if run.injections
                                                 else ""), n * d * item * (1 + run.injections))
    span = min(run.prefill_chunk or length, length)
    if run.encoded_on_host and where != "host":
        parts.append((encoded[0], (1 + run.injections) * pinned_bytes(n * d * item, where), "host"))
        fixed.append((f"one prefill call's span of them ({min(span, n)} tokens)",
                      min(span, n) * d * item * (1 + run.injections), where))
    else:
        parts.append((*encoded, where))
    if run.rows_on_host and where != "host":
        parts.append((f"layer K's input rows [{length}, {d}]", pinned_bytes(length * d * item, where), "host"))
        # a call's embeddings stay on the device (its output rows are in its working memory until written)
        (fixed if span < length else parts).append((f"one prefill call's embeddings [{span}, {d}]",
                                                    span * d * item, where))
    else:
        parts.append(rows)
    parts += [kv_below, scores]
    if not stock:
        parts += continuation_parts(llm, run.layer, length, length - n + kept, int(run.max_new_tokens),
                                    run.prefill_chunk, item, where, kv_on_host=run.kv_on_host)[:-1]
    (fixed if span < length else parts).append(one_call)
    if state:
        fixed.append(("the linear-attention layers' states", state, where))
    resident = ((f"the model's weights", int(run.weights), where),) if run.weights else ()
    return MemoryEstimate(parts=tuple(parts), frames=frames, fixed=tuple(fixed), resident=resident)
