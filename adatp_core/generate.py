"""Step 6: continue from layer K with the kept tokens, then decode.

The kept tokens take their layer-K input hidden states from ExtractAttention's
partial prefill and keep their ORIGINAL position ids. Layers < K keep the full
KV cache; layers >= K hold only the kept tokens. Decoding continues from the
original prompt length. A state that no PruneTokens touched keeps every token:
that is the vanilla model, exactly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .errors import AdaTPEnvironmentError, AdaTPInputError
from .memory import free_memory, run_guarded
from .cache import KVCache
from .sdpa import plan_free_attention
from .state import AdaTPState
from .static_decode import StaticDecoders
from .timing import synchronize

log = logging.getLogger(__name__)
MAX_NEW_TOKENS_LIMIT = 8192
# "auto": static on CUDA (graphs replayed across answers), default elsewhere (on CPU
# static steps are not faster: there is no launch cost to save).
DECODE_MODES = ("default", "static", "auto")
# Stage timings (seconds, in stats) that make up AdaTP's selection and the time to first token,
# counted from decoded frames: the video prefix's key (hashing the frames), preprocessing, vision, partial
# prefill, selection, rest of the prefill.
SELECTION_TIMES = ("time_global_debias", "time_local_debias", "time_prune")
PREFILL_TIMES = ("time_prefix_key", "time_preprocess", "time_vision", "time_attention") + SELECTION_TIMES


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. Greedy unless do_sample."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks)
    decode_mode: str = "auto"  # "static": fixed-shape steps, a CUDA graph on CUDA; "auto": static on CUDA only

    def __post_init__(self):
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS_LIMIT:
            raise AdaTPInputError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}], got {n!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise AdaTPInputError(f"temperature must be > 0, got {self.temperature} (1.0 is neutral)")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise AdaTPInputError(f"top_p must be in (0, 1], got {self.top_p} (1.0 keeps every token)")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise AdaTPInputError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.decode_mode not in DECODE_MODES:
            raise AdaTPInputError(f"decode_mode must be one of {DECODE_MODES}, got {self.decode_mode!r}")


@dataclass(frozen=True)
class Answer:
    """text: the decoded answer. token_ids: the generated ids (EOS excluded).
    stats: the state's stats plus generation figures. logits: [steps, V] float32
    logits that chose each generated token (only when asked for)."""

    text: str
    token_ids: tuple[int, ...]
    stats: dict
    logits: torch.Tensor | None = None


def resolve_decode_mode(mode: str, device) -> str:
    """The mode that runs: auto is static on CUDA and default elsewhere."""
    if mode == "auto":
        return "static" if torch.device(device).type == "cuda" else "default"
    return mode


def next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> int:
    """logits: [V] float32 -> the chosen token id. Greedy, or temperature and
    top-p sampling with ``generator``; all on the logits' device, both decode modes."""
    if not cfg.do_sample:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, idx = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= cfg.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate_answer(state: AdaTPState, sampling: SamplingConfig | None = None,
                    on_token: Callable[[int, int], None] | None = None,
                    return_logits: bool = False) -> Answer:
    """Answer the state's question from its kept tokens.

    on_token(step, token_id) is called after each generated token; it may raise
    (ComfyUI's interrupt) to stop generation.
    """
    cfg = sampling or SamplingConfig()
    model = state.model
    adapter = model.adapter
    limit = getattr(adapter.text_model.config, "max_position_embeddings", None)
    if limit is not None and state.prompt.length + cfg.max_new_tokens > limit:
        raise AdaTPInputError(
            f"prompt ({state.prompt.length} tokens) plus max_new_tokens ({cfg.max_new_tokens}) exceeds "
            f"the model's context of {limit}; lower max_new_tokens or use fewer frames.")
    generator = None
    if cfg.do_sample:
        generator = torch.Generator(device=adapter.output_device).manual_seed(cfg.seed)  # beside the logits
    if adapter.is_split and resolve_decode_mode(cfg.decode_mode, adapter.device) == "static":
        if cfg.decode_mode == "static":
            log.warning("static decoding needs the model on one device; decoding step by step instead")
        cfg = replace(cfg, decode_mode="default")
    try:
        run = run_guarded(lambda: _decode(state, cfg, generator, on_token, return_logits), "generation")
    except AdaTPEnvironmentError:  # out of memory: static decoding's kept buffers go too
        decoders = getattr(model, "static_decoders", None)
        if decoders is not None:
            decoders.clear()
            free_memory()
        raise
    stats = {**state.stats}
    stats["time_selection"] = sum(stats.get(k, 0.0) for k in SELECTION_TIMES)
    stats["time_to_first_token"] = sum(stats.get(k, 0.0) for k in PREFILL_TIMES) + run.prefill_seconds
    stats.update({
        "new_tokens": len(run.tokens),
        "kv_lengths": run.kv_lengths,
        "time_prefill_continue": run.prefill_seconds,
        "time_generate": run.decode_seconds,
        "decode_ms_per_token": 1000 * run.decode_seconds / run.passes if run.passes else 0.0,
        "decode_mode": run.mode,
        "time_graph_capture": run.capture_seconds,  # one-time per model and bucket; not in the two above
    })
    text = model.tokenizer.decode(run.tokens, skip_special_tokens=True).strip()
    return Answer(text=text, token_ids=tuple(run.tokens), stats=stats, logits=run.logits)


@dataclass
class _DecodeRun:
    tokens: list
    logits: torch.Tensor | None
    kv_lengths: tuple
    prefill_seconds: float
    decode_seconds: float
    passes: int
    mode: str
    capture_seconds: float


def _decode(state: AdaTPState, cfg: SamplingConfig, generator, on_token, return_logits: bool) -> _DecodeRun:
    """The continuation from layer K and the decoding loop (see generate_answer)."""
    adapter = state.model.adapter
    dev = adapter.device
    eos = set() if cfg.ignore_eos else set(adapter.eos_token_ids)
    mode = resolve_decode_mode(cfg.decode_mode, dev)
    tokens: list[int] = []
    chosen_logits = []
    with torch.inference_mode(), plan_free_attention(dev):
        synchronize(dev)
        start = time.perf_counter()
        positions = state.kept_positions()  # indices go to each tensor's device (a split model has several)
        hidden = state.hidden.index_select(1, positions.to(state.hidden.device))
        position_ids = state.position_ids.index_select(-1, positions.to(state.position_ids.device))
        reserve = 0 if mode == "static" else cfg.max_new_tokens  # static copies into its own buffers
        cache = KVCache(adapter.num_layers, past=state.past_kv, reserve=reserve)
        hidden = adapter.run_layers(hidden, position_ids, cache, state.layer, adapter.num_layers,
                                    inject=state.kept_injection())
        logits = adapter.logits(hidden[:, -1:])[-1]
        del hidden
        static = None
        if mode == "static":
            decoders = getattr(state.model, "static_decoders", None)
            if decoders is None:  # a model object without the per-model store: buffers for this answer only
                decoders = StaticDecoders(max_buckets=1)
            step_fn = decoders.decoder(adapter, cache, cfg.max_new_tokens, state.position_ids)
            static = step_fn.cache
            cache = None
        first_position = adapter.next_position_ids(state.position_ids, 0)  # one host sync, not one per token
        synchronize(dev)
        prefill_done = time.perf_counter()
        capture_seconds = step_fn.capture() if static is not None else 0.0  # once per model and bucket
        decode_start = time.perf_counter()
        passes = 0  # decode forward passes
        for step in range(cfg.max_new_tokens):
            token = next_token(logits, cfg, generator)
            if return_logits:
                chosen_logits.append(logits)
            if token in eos:
                break
            tokens.append(token)
            if on_token is not None:
                on_token(step, token)
            if step == cfg.max_new_tokens - 1:
                break
            pos = first_position + step
            if static is not None:
                logits = step_fn(token, pos, step)
                if return_logits:  # on CUDA the graph's output buffer, rewritten by the next step
                    logits = logits.clone()
            else:
                ids = torch.tensor([[token]], device=dev)
                hidden = adapter.run_layers(adapter.embed_tokens(ids), pos, cache, 0, adapter.num_layers)
                logits = adapter.logits(hidden)[-1]
            passes += 1
        synchronize(dev)
        end = time.perf_counter()
    lengths = cache.lengths() if static is None else static.lengths(passes)
    return _DecodeRun(tokens=tokens, logits=torch.stack(chosen_logits) if return_logits else None,
                      kv_lengths=lengths, prefill_seconds=prefill_done - start,
                      decode_seconds=end - decode_start, passes=passes, mode=mode,
                      capture_seconds=capture_seconds)
