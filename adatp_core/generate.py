"""Step 6: continue from layer K with the kept tokens, then decode.

The kept tokens take their layer-K input hidden states from ExtractAttention's
partial prefill and keep their ORIGINAL position ids. Layers < K keep the full
KV cache; layers >= K hold only the kept tokens. Decoding continues from the
original prompt length. A state that no PruneTokens touched keeps every token:
that is the vanilla model, exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .errors import AdaTPEnvironmentError, AdaTPInputError, AdaTPOutOfMemoryError, AdaTPTransformersError
from .fits import place_of
from .memory import BOTH_OOM_ADVICE, HOST_OOM_ADVICE, drop_kept, fallback_allowed, release_pinned, run_guarded
# The sampling code's home is sampling.py; these names stay importable from here.
from .sampling import DECODE_MODES, MAX_NEW_TOKENS_LIMIT, SamplingConfig, TokenChooser, next_token  # noqa: F401
from .decode import continue_prefill, kv_place, kv_retry_place
from .models.base import FALLBACK_STATIC_DECODING
from .places import Place, place_stats
from .sdpa import plan_free_attention
from .state import AdaTPState
from .hf.cache import RowsKVCache
from .static_decode import StaticDecoders
from .steps import StepRunner, static_pays_for_answer
from .timing import DecodeStats, synchronize

log = logging.getLogger(__name__)
# Stage timings (seconds, in stats) that make up AdaTP's selection and the time to first token,
# counted from decoded frames: the video prefix's key (hashing the frames), preprocessing, vision, partial
# prefill, selection, rest of the prefill.
SELECTION_TIMES = ("time_global_debias", "time_local_debias", "time_prune")
PREFILL_TIMES = ("time_prefix_key", "time_preprocess", "time_vision", "time_attention") + SELECTION_TIMES


@dataclass(frozen=True)
class Answer:
    """text: the decoded answer. token_ids: the generated ids (EOS excluded).
    stats: the state's stats plus generation figures. logits: [steps, V] float32
    logits that chose each generated token (only when asked for). decoding: the generation's
    figures, typed (also in stats, under their keys)."""

    text: str
    token_ids: tuple[int, ...]
    stats: dict
    logits: torch.Tensor | None = None
    decoding: DecodeStats | None = None


def resolve_decode_mode(mode: str, device) -> str:
    """The mode that runs: auto is static on CUDA and default elsewhere."""
    if mode == "auto":
        return "static" if torch.device(device).type == "cuda" else "default"
    return mode


# Why an answer whose keys and values live on the host decodes in default steps (its stats' fallback).
KV_ON_HOST_NOT_STATIC = ("static decoding replays CUDA graphs over fixed buffers on the device, and layers >= K's "
                         "keys and values live on the host; this answer decoded in default steps")


def generate_answer(state: AdaTPState, sampling: SamplingConfig | None = None,
                    on_token: Callable[[int, int], None] | None = None,
                    return_logits: bool = False, kv: str = "auto") -> Answer:
    """Answer the state's question from its kept tokens.

    on_token(step, token_id) is called after each generated token; it may raise
    (ComfyUI's interrupt) to stop generation.
    kv: where layers >= K keep their keys and values while the answer is made: "auto" (the check
    before decoding's choice, ``state.places``, else the device, or the host when the device is short:
    decode.kv_place), "device" or "host". On the host each layer is staged on the device while it runs
    (the next one prefetched), and decoding runs in default steps (where auto would have run static
    steps, the stats' fallback says why; decode_mode="static" asked for is refused).
    stats["kv_on"], stats["kv_reason"] and stats["kv_moved"] say which and why. When auto chose the
    device by the estimate (``Place.auto``) and the answer runs out of memory there (not in on_token),
    it runs again with them on the host if the host has room for them (the reason says so). The failed
    run drops static decoding's buffers but keeps the model's video prefixes (a long video's is the most
    valuable to keep); they are dropped only where no retry follows or the retry runs out too (the error
    says how many). An answer that runs again (this, or static
    decoding that failed) gives the same tokens: on_token is not called again for those it was given
    already, only from the first that differs, if any (its step then goes back).
    """
    model = state.model
    adapter = model.adapter
    cfg = resolved_sampling(adapter, sampling)
    check_room(state, cfg)
    if adapter.is_split and resolve_decode_mode(cfg.decode_mode, adapter.device) == "static":
        if cfg.decode_mode == "static":
            log.warning("static decoding needs the model on one device; decoding step by step instead")
        cfg = replace(cfg, decode_mode="default")
    place = kv_place(state, cfg.max_new_tokens, kv)
    callback = _TokenCallback(on_token) if on_token is not None else None
    # auto chose the device by the estimate: running out there answers again with them on the host, and the
    # model's kept video prefixes (a long video's is the most valuable to keep) stay unless that fails too;
    # static decoding asked for cannot run over them on the host: its out of memory error stands
    retryable = place.auto and not place.host and cfg.decode_mode != "static"
    homed = place.host
    try:
        try:
            run, cfg = _answer_run(state, cfg, callback, return_logits, place, drop_prefixes=not retryable)
        except AdaTPOutOfMemoryError as exc:
            # asked for, or set by the model's place, or out of memory in on_token: the error stands
            if not retryable or (callback is not None and callback.raised):
                drop_kept(state.model)
                raise
            retry = kv_retry_place(state, cfg.max_new_tokens)
            if not retry.host:
                dropped = drop_kept(state.model)
                raise AdaTPOutOfMemoryError(f"{exc} Layers >= K's keys and values could not go to the host either: "
                                            f"{retry.reason}.{_dropped_text(dropped)}") from None
            log.warning("out of memory with layers >= K's keys and values on the device; answering again with them "
                        "on the host: %s", exc)
            prefixes = len(getattr(model, "prefix_cache", None) or ())
            place = Place(True, f"the device ran out of memory with them there, though {place.reason}; this answer "
                                "ran again with them on the host" + (
                                    f" (the {prefixes} video prefix(es) the model keeps were kept)" if prefixes else ""))
            homed = True
            try:
                run, cfg = _answer_run(state, cfg, callback, return_logits, place,  # out of memory: drops them
                                       host_advice=BOTH_OOM_ADVICE)
            except AdaTPOutOfMemoryError as again:
                dropped = prefixes - len(getattr(model, "prefix_cache", None) or ())
                raise AdaTPOutOfMemoryError(f"{again}{_dropped_text(dropped)}") from None
    finally:
        if homed:
            release_pinned()  # the homes are gone (or the answer failed); torch would keep their pinned blocks
    answer = answer_from_run(state, run, cfg)
    # "host": homed there and staged (a CPU model's too, when asked); else the model's device ("host" for a CPU
    # model, as rows_on and encoded_on say)
    answer.stats.update(place_stats("kv", place, "host" if place.host else place_of(adapter.device)))
    if place.host:
        answer.stats["kv_staged_mb"] = round(run.kv_staged_bytes / 1e6, 1)
    return answer


def _dropped_text(dropped: int) -> str:
    """What running out of memory dropped, for the error: the model's kept video prefixes."""
    return (f" The {dropped} video prefix(es) the model kept were dropped: a next question over that video "
            "computes its prefix again." if dropped else "")


def _answer_run(state: AdaTPState, cfg: SamplingConfig, on_token, return_logits: bool,
                place: Place, drop_prefixes: bool = True,
                host_advice: str = HOST_OOM_ADVICE) -> tuple[DecodeRun, SamplingConfig]:
    """One answer's decoding (``_decode_or_fall_back``, out of memory made clear by run_guarded) and the
    settings it ran with: over keys and values on the host (``place``) auto decodes in default steps
    (the fallback says so where it would have run static ones) and static asked for is refused; in auto
    mode on a model whose static decoding failed before, default steps. drop_prefixes: False keeps the model's
    video prefixes when it runs out of memory (the caller answers again first). host_advice: run_guarded's
    where the host runs out."""
    adapter = state.model.adapter
    kv_on_host = place.host
    not_static = None
    if kv_on_host and resolve_decode_mode(cfg.decode_mode, adapter.device) == "static":
        if cfg.decode_mode == "static":
            raise AdaTPInputError(f"decode_mode=static replays CUDA graphs over fixed buffers on the device, and "
                                  f"layers >= K's keys and values are on the host ({place.reason}); set decode_mode "
                                  "auto or default (default steps), or kv=device with room for them there")
        if _static_pays(state, cfg):
            not_static = KV_ON_HOST_NOT_STATIC
            log.info("%s", not_static)
        cfg = replace(cfg, decode_mode="default")
    fallback = adapter.fallbacks.get(FALLBACK_STATIC_DECODING) if cfg.decode_mode == "auto" else None
    if fallback is not None:  # static decoding failed on this model before: auto stays default
        cfg = replace(cfg, decode_mode="default")
    # Out of memory: static decoding's kept buffers go too (run_guarded drops them).
    run = run_guarded(lambda: _decode_or_fall_back(state, cfg, on_token, return_logits, kv_on_host), "generation",
                      model=state.model, drop_prefixes=drop_prefixes, host_advice=host_advice)
    if run.fallback is None and (fallback or not_static) is not None:
        run = replace(run, fallback=not_static or fallback)
    return run, cfg


def resolved_sampling(adapter, sampling: SamplingConfig | None) -> SamplingConfig:
    """Every unset setting filled in: the model's generation_config.json, else transformers'
    defaults (sampling.py)."""
    return (sampling or SamplingConfig()).resolve(getattr(adapter.model, "generation_config", None))


def check_room(state: AdaTPState, cfg: SamplingConfig) -> None:
    """Refuse a prompt that leaves no room for max_new_tokens in the model's context: the answer's
    positions go on from the prompt's largest position id (its length for 1-D positions; for M-RoPE,
    which grows with the video's time, far fewer: VideoLLMAdapter.check_context)."""
    limit = getattr(state.model.adapter.text_model.config, "max_position_embeddings", None)
    if limit is None:
        return
    extent = int(state.position_ids.max()) + 1
    if extent + cfg.max_new_tokens > limit:
        what = f"{state.prompt.length} tokens" if extent == state.prompt.length else \
            f"{state.prompt.length} tokens, positions up to {extent - 1}"
        raise AdaTPInputError(
            f"prompt ({what}) plus max_new_tokens ({cfg.max_new_tokens}) exceeds "
            f"the model's context of {limit}; lower max_new_tokens or use fewer frames.")


def sampling_generator(adapter, cfg: SamplingConfig) -> torch.Generator | None:
    """The answer's own random generator, seeded, beside the logits (None when greedy)."""
    if not cfg.do_sample:
        return None
    return torch.Generator(device=adapter.output_device).manual_seed(cfg.seed)


def answer_from_run(state: AdaTPState, run: DecodeRun, cfg: SamplingConfig) -> Answer:
    """The answer and its stats (the state's, plus the generation's figures)."""
    model = state.model
    stats = {**state.stats}
    stats["time_selection"] = sum(stats.get(k, 0.0) for k in SELECTION_TIMES)
    stats["time_to_first_token"] = sum(stats.get(k, 0.0) for k in PREFILL_TIMES) + run.prefill_seconds
    decoding = DecodeStats(
        new_tokens=len(run.tokens), kv_lengths=run.kv_lengths, prefill_seconds=run.prefill_seconds,
        decode_seconds=run.decode_seconds, ms_per_token=1000 * run.decode_seconds / run.passes if run.passes else 0.0,
        mode=run.mode, capture_seconds=run.capture_seconds, graph_note=run.graph_note, sampling=cfg.settings())
    stats.update(decoding.as_dict())
    if run.fallback:
        stats[FALLBACK_STATIC_DECODING] = run.fallback
        stats["time_to_first_token"] += run.fallback_seconds  # the failed static attempt, waited for too
    text = model.tokenizer.decode(run.tokens, skip_special_tokens=True).strip()
    return Answer(text=text, token_ids=tuple(run.tokens), stats=stats, logits=run.logits, decoding=decoding)


@dataclass
class DecodeRun:
    """What one answer's decoding did (generate_answer; batching.py for rows decoded together)."""

    tokens: list
    logits: torch.Tensor | None
    kv_lengths: tuple
    prefill_seconds: float
    decode_seconds: float
    passes: int
    mode: str
    capture_seconds: float
    graph_note: str = ""
    fallback: str | None = None  # why static decoding gave way to default decoding in this answer
    fallback_seconds: float = 0.0  # spent in the failed static attempt
    kv_staged_bytes: int = 0  # keys and values on the host: copied to the device (the continuation and every step)


class _TokenCallback:
    """``on_token``, remembering whether it raised (its errors, ComfyUI's Cancel, are never retried) and
    what it was given: a run again from step 0 (out of memory, static decoding that failed) gives the
    same tokens, and those it had already are not given again, only from the first that differs."""

    def __init__(self, fn: Callable[[int, int], None]):
        self.fn = fn
        self.raised = False
        self.given: list[int] = []

    def __call__(self, step: int, token: int) -> None:
        if step < len(self.given):
            if self.given[step] == token:
                return  # a run again, this far the same
            del self.given[step:]
        try:
            self.fn(step, token)
        except BaseException:
            self.raised = True
            raise
        self.given.append(token)


def _decode_or_fall_back(state: AdaTPState, cfg: SamplingConfig, on_token, return_logits: bool,
                         kv_on_host: bool = False) -> DecodeRun:
    """``_decode``; if static decoding raises anywhere (buffers, capture, a replay, the tokens
    it yields) in auto mode, the answer restarts in default mode from the prefilled state,
    with a fresh generator: the same answer as default decoding. This model then decodes
    auto answers in default mode until it is reloaded (``adapter.fallbacks``).

    Not retried: errors in ``on_token``, running out of memory and interrupts
    (memory.fallback_allowed). With decode_mode "static" asked for explicitly, the error is
    raised as AdaTPEnvironmentError naming the setting that avoids it. After a fallback the
    answer runs again from step 0; on_token (a ``_TokenCallback``) is given only the tokens it has
    not had.
    """
    adapter = state.model.adapter
    callback = on_token
    start = time.perf_counter()
    try:
        return _decode(state, cfg, sampling_generator(adapter, cfg), callback, return_logits, kv_on_host)
    except Exception as exc:
        static = resolve_decode_mode(cfg.decode_mode, adapter.device) == "static"
        if not static or (callback is not None and callback.raised) or not fallback_allowed(exc):
            raise
        detail = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
        if cfg.decode_mode == "static":
            # transformers' own failure keeps its class and whole message (the versions, what to do)
            kind, detail = ((AdaTPTransformersError, str(exc)) if isinstance(exc, AdaTPTransformersError)
                            else (AdaTPEnvironmentError, detail))
            raise kind(f"static decoding failed on {adapter.device} ({detail}); set decode_mode=default "
                       "(or auto, which falls back to default decoding by itself)") from exc
        reason = (f"static decoding failed ({detail}); this answer restarted in default decoding, "
                  "which auto mode keeps until the model is reloaded")
        log.warning("%s", reason, exc_info=True)
    adapter.fallbacks[FALLBACK_STATIC_DECODING] = reason
    drop_kept(state.model, prefixes=False)  # the failed run's buffers and graph are never reused
    failed_seconds = time.perf_counter() - start
    run = _decode(state, replace(cfg, decode_mode="default"), sampling_generator(adapter, cfg), callback,
                  return_logits, kv_on_host)
    return replace(run, fallback=reason, fallback_seconds=failed_seconds)


def _decode(state: AdaTPState, cfg: SamplingConfig, generator, on_token, return_logits: bool,
            kv_on_host: bool = False) -> DecodeRun:
    """The continuation from layer K and the decoding loop (see generate_answer): one row stepped by
    the step runner (steps.py), as captions decoded together are. kv_on_host: layers >= K's keys and
    values live on the host (default steps only)."""
    adapter = state.model.adapter
    dev = adapter.device
    eos = set() if cfg.ignore_eos else set(adapter.eos_token_ids)
    mode = resolve_decode_mode(cfg.decode_mode, dev)
    tokens: list[int] = []
    chosen_logits = []
    chooser = TokenChooser(cfg, state.prompt.input_ids, generator)  # penalises the prompt's ids too
    with torch.inference_mode(), plan_free_attention(dev):
        synchronize(dev)
        start = time.perf_counter()
        if cfg.decode_mode == "auto" and mode == "static" and not _static_pays(state, cfg):
            mode = "default"  # static pays off at short caches only
        runner, logits = _one_row(state, cfg, mode, kv_on_host)
        first_position = adapter.next_position_ids(state.position_ids, 0)  # one host sync, not one per token
        synchronize(dev)
        prefill_done = time.perf_counter()
        graph = runner.capture() if mode == "static" else None  # once per model and bucket
        decode_start = time.perf_counter()
        passes = 0  # decode forward passes
        for step in range(cfg.max_new_tokens):
            chosen = chooser(logits)
            token = int(chosen)
            if return_logits:
                chosen_logits.append(logits)
            if token in eos:
                break
            tokens.append(token)
            if on_token is not None:
                on_token(step, token)
            if step == cfg.max_new_tokens - 1:
                break
            logits = runner(chosen.view(1), first_position + step)[0]  # the runner's copy: kept as it is
            passes += 1
        synchronize(dev)
        end = time.perf_counter()
    return DecodeRun(tokens=tokens, logits=torch.stack(chosen_logits) if return_logits else None,
                      kv_lengths=runner.cache.row_lengths(0), prefill_seconds=prefill_done - start,
                      decode_seconds=end - decode_start, passes=passes, mode=mode,
                      capture_seconds=graph.seconds if graph is not None else 0.0,
                      graph_note=graph.note if graph is not None else "",
                      kv_staged_bytes=runner.cache.staging.staged_bytes if runner.cache.staging is not None else 0)


def _static_pays(state: AdaTPState, cfg: SamplingConfig) -> bool:
    """Whether auto's static steps pay off for this answer (steps.static_pays_for_answer: short caches)."""
    adapter = state.model.adapter
    kept = len(state.kept_positions())
    lengths = [state.prompt.length if i < state.layer else kept for i in range(adapter.num_layers)
               if not adapter.is_linear_layer(i)]  # a linear layer's state has no capacity
    return static_pays_for_answer(adapter, lengths, cfg.max_new_tokens)


def _one_row(state: AdaTPState, cfg: SamplingConfig, mode: str, kv_on_host: bool = False
             ) -> tuple[StepRunner, torch.Tensor]:
    """The prefill's continuation and the runner over its one row, with the first token's logits [V].
    Default: the row is the prefill's own cache, allocated with room for the new tokens (layers >= K
    on the host with ``kv_on_host``). Static: the prefill is copied into a bucket's buffers kept per
    model (static_decode.StaticDecoders)."""
    adapter = state.model.adapter
    if mode != "static" or kv_on_host:
        cache, logits = continue_prefill(state, cfg.max_new_tokens, kv_on_host)
        return StepRunner(adapter, RowsKVCache.holding(cache), state.position_ids), logits
    cache, logits = continue_prefill(state, 0)
    decoders = getattr(state.model, "static_decoders", None)
    if decoders is None:  # a model object without the per-model store: buffers for this answer only
        decoders = StaticDecoders(max_buckets=1)
    return decoders.decoder(adapter, cache, cfg.max_new_tokens, state.position_ids), logits
