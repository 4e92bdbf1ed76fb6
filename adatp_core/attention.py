"""Step 2: text->visual attention at layer K-1, from a partial prefill.

The score comes from the attention function itself (hf/attention_hook.py):
a per-call ``AttentionProbe`` asks one layer's attention call to score the query
rows on the visual keys, with the rotated queries and keys that the layer uses.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from .debias import text_relevance
from .errors import AdaTPEnvironmentError, AdaTPInputError
from .fits import (DEFAULT_PREFILL_CHUNK, check_max_pixels, check_question, kept_prefix_bytes, place_name, plan_prompt,
                   runtime_places)
from .fits import check_video_fits  # noqa: F401  (its home is fits.py; it stays importable from here)
from .flops import flops_summary
from .memory import buffer_like, free_memory, run_guarded
from .hf.cache import KVCache
from .places import KEPT_WITH_PREFIX, Place, Places, check_place, place_stats
from .prefix_cache import FrozenPrefix
from .models.base import FALLBACK_BATCHED_VISION, AttentionProbe, Injection
from .hf.kernels import kernels_line
from .runtime import VideoLLM
from .sdpa import plan_free_attention
from .state import AdaTPState
from .streaming import EncodedVideo
from .timing import timed

log = logging.getLogger(__name__)

QUERY_MODES = ("text", "last")
MIN_PREFILL_CHUNK = 16
MAX_PREFILL_CHUNK = 1 << 24


def _check_frames(frames) -> torch.Tensor:
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise AdaTPInputError(f"frames must be an IMAGE batch [T, H, W, 3], got {shape}")
    if frames.shape[0] < 1:
        raise AdaTPInputError("no frames were given; load at least one frame")
    return frames


def _encode(adapter, frames, prompt, times: dict, places: Places):
    """The video's Encoded: a streamed video's (encoded before, streaming.encode_video, where it was
    placed then), or the frames' encoded a chunk at a time (``encode_frames``), their visual and
    DeepStack rows written where ``places.encoded`` says."""
    if isinstance(frames, EncodedVideo):
        times.setdefault("time_preprocess", 0.0)
        times.setdefault("time_vision", 0.0)
        return frames.encoded
    return adapter.encode_frames(frames, prompt.plan, times, place=places.encoded.device)


def _frames_key(store, frames):
    """The frames' part of a prefix key: a streamed video's file and times, or the frames' digest."""
    return frames.key if isinstance(frames, EncodedVideo) else store.frame_keys(frames)


def _probe(prompt, layer: int, query: str, first: int) -> AttentionProbe:
    """The layer K-1 probe for a forward call over positions [first, L)."""
    if query == "text":
        rows = torch.arange(prompt.after_video - first, prompt.length - first)
    else:
        rows = torch.tensor([prompt.length - 1 - first])
    return AttentionProbe(layer - 1, rows, prompt.visual_positions)


def _probe_scores(probe: AttentionProbe, dev) -> torch.Tensor:
    if probe.scores is None:
        raise AdaTPEnvironmentError("the attention probe was not called; load the model with AdaTP's loader")
    return probe.scores.to(dev)  # layer K-1 may sit on another GPU of a split model


def check_prefill_chunk(chunk) -> int:
    """Tokens per forward call of the prefill: 0 (the whole prompt in one call) or at least
    MIN_PREFILL_CHUNK."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or (chunk != 0 and not
                                                                   MIN_PREFILL_CHUNK <= chunk <= MAX_PREFILL_CHUNK):
        raise AdaTPInputError(f"prefill_chunk must be 0 (the whole prompt in one call) or between "
                              f"{MIN_PREFILL_CHUNK} and {MAX_PREFILL_CHUNK} tokens per call, got {chunk!r}; "
                              f"{DEFAULT_PREFILL_CHUNK} is the default")
    return chunk


def _prompt_spans(adapter, prompt, chunk: int) -> list[tuple[int, int]]:
    """The forward calls of layers < K over the prompt: one when it fits in a chunk; else the
    video's prefix [0, p) in chunks (``chunk_spans``; p = ``prefix_length``), then the rest
    [p, L) in one call, which holds every query row of the scores."""
    p = adapter.prefix_length(prompt)
    if not chunk or prompt.length <= chunk or not p:
        return [(0, prompt.length)]
    return adapter.chunk_spans(0, p, chunk) + [(p, prompt.length)]


class _Rows:
    """Layer K's input rows of positions [offset, offset + n), [1, n, D], written span by span
    where they are to live (``device``; None: where the layers put them). A single span over
    all of them is kept as it comes, with no copy."""

    def __init__(self, n: int, offset: int = 0, device: torch.device | None = None):
        self.n, self.offset, self.device = n, offset, device
        self.tensor: torch.Tensor | None = None

    def write(self, a: int, b: int, hidden: torch.Tensor) -> None:
        if self.tensor is None and (a, b) == (self.offset, self.offset + self.n) and \
                self.device in (None, hidden.device):
            self.tensor = hidden
            return
        if self.tensor is None:
            self.tensor = buffer_like((1, self.n, hidden.shape[-1]), hidden, self.device or hidden.device)
        self.tensor[:, a - self.offset:b - self.offset].copy_(hidden)


def _visual_injection(prompt, encoded) -> Injection | None:
    """DeepStack's features at the visual positions (None for families without them)."""
    return Injection(prompt.visual_positions, encoded.injections) if encoded.injections else None


def below_k_released(encoded, layer: int, done: int, prompt):
    """``encoded`` without the DeepStack features of layers < K (None in their place) when layers < K
    have run over every visual position already (all of them before ``done``): a state continues
    from K, and a reused prefix runs layers < K only over positions from ``done`` on. At a thousand
    frames those features are as large as the visual rows themselves, per layer."""
    if not encoded.injections or layer == 0 or int(prompt.visual_positions[-1]) >= done:
        return encoded
    return replace(encoded, injections=tuple(None if i < layer else f for i, f in enumerate(encoded.injections)))


def _layers_below_k(adapter, prompt, encoded, layer: int, position_ids, spans, cache, rows: _Rows,
                    probe=None) -> None:
    """Layers 0..K-1 over the prompt's positions in ``spans``, one call each, into ``cache`` (which
    holds every position before the first span); layer K's input rows go to ``rows``. K = 0: the
    rows are the input embeddings."""
    def embeds(a, b):
        return adapter.assemble(prompt, encoded, a, b)

    if layer == 0:
        for a, b in spans:
            rows.write(a, b, embeds(a, b))
        return
    adapter.run_chunks(spans, embeds, position_ids, cache, 0, layer, probe=probe,
                       inject=_visual_injection(prompt, encoded), write=rows.write)


def _relevance(adapter, prompt, encoded, block: int = 0) -> torch.Tensor:
    """text_relevance of every visual row, ``block`` rows at a time (0: all at once) brought to the
    question's device: the rows may wait on the host (Places.encoded), and a float32 copy of all
    of them is twice their size in bf16. Each row's cosine is its own."""
    q_start, q_end = prompt.question
    question = adapter.embed_tokens(prompt.input_ids[q_start:q_end])
    visual = encoded.visual
    block = block or visual.shape[0]
    return torch.cat([text_relevance(visual[i:i + block].to(question.device, non_blocking=True), question)
                      for i in range(0, visual.shape[0], block)])


def _prefill(adapter, frames, prompt, layer: int, query: str, times: dict, spans, places: Places):
    """Vision encoder, prompt assembly, layers 0..K-1 and the scores over the whole prompt, in the
    calls of ``spans`` (``_prompt_spans``: one for a prompt within a chunk), the encoded rows and
    layer K's input rows where ``places`` says: the path when no prefix is reused."""
    dev = adapter.device
    with torch.inference_mode():
        encoded = _encode(adapter, frames, prompt, times, places)
        with timed(times, "time_attention", dev):
            position_ids = adapter.position_ids(prompt)
            relevance = _relevance(adapter, prompt, encoded, spans[0][1] - spans[0][0])
            rows = _Rows(prompt.length, 0, places.rows.device)
            cache = KVCache(adapter.layer_kinds, reserve=prompt.length - spans[0][1])  # room for every call
            probe = _probe(prompt, layer, query, spans[-1][0]) if layer else None
            _layers_below_k(adapter, prompt, encoded, layer, position_ids, spans, cache, rows, probe)
            if layer == 0:
                return encoded, rows.tensor, (), relevance, relevance, position_ids
            return encoded, rows.tensor, cache.export(layer), _probe_scores(probe, dev), relevance, position_ids


def _video_prefix(adapter, prompt, encoded, layer: int, position_ids, p: int, chunk: int,
                  places: Places) -> FrozenPrefix:
    """Layers 0..K-1 over the question-independent positions [0, p) (``prefix_length``), in
    chunks (``chunk_spans``), layer K's input rows where ``places.rows`` says."""
    spans = adapter.chunk_spans(0, p, chunk)
    rows = _Rows(p, 0, places.rows.device)
    cache = KVCache(adapter.layer_kinds, reserve=p - spans[0][1])
    _layers_below_k(adapter, prompt, encoded, layer, position_ids, spans, cache, rows)
    return FrozenPrefix(below_k_released(encoded, layer, p, prompt), cache.export(layer) if layer else (), rows.tensor)


def _prefill_with_prefix(model, frames, prompt, layer: int, query: str, times: dict, key_parts: tuple,
                         chunk: int, places: Places):
    """``_prefill``'s results in two parts: the video's prefix (from the model's store when
    these frames were seen with these settings, else computed in chunks and stored), then the
    rest [p, L) through layers < K in one call, attending to the prefix. p is the adapter's
    ``prefix_length``: where the question's text starts (after_video), or before it.
    Returns _prefill's tuple, the prefix's stats and the number of forward calls made."""
    adapter, store = model.adapter, model.prefix_cache
    dev = adapter.device
    p = adapter.prefix_length(prompt)
    calls = 1
    with torch.inference_mode():
        with timed(times, "time_prefix_key"):
            store.check_weights(adapter.model)
            # A chunked prefix differs from one pass within float tolerance: the chunk is part of what was computed.
            chunked = len(adapter.chunk_spans(0, p, chunk)) > 1
            key = (_frames_key(store, frames), *key_parts, layer, tuple(prompt.input_ids[:p].tolist()),
                   chunk if chunked else 0)
            prefix = store.get(key)
        status = "hit" if prefix is not None else "miss"
        times.setdefault("time_preprocess", 0.0)
        times.setdefault("time_vision", 0.0)
        with timed(times, "time_attention", dev):
            position_ids = adapter.position_ids(prompt)
        if prefix is None:
            if places.kept:  # the plan counted the kept prefixes' device memory as free: it is needed now
                store.clear()
                free_memory()
            encoded = _encode(adapter, frames, prompt, times, places)
            with timed(times, "time_attention", dev):
                prefix = _video_prefix(adapter, prompt, encoded, layer, position_ids, p, chunk, places)
            calls += len(adapter.chunk_spans(0, p, chunk))
            not_kept = store.put(key, prefix)
            if not_kept:
                status = f"miss ({not_kept})"
        with timed(times, "time_question", dev):
            encoded = prefix.encoded
            question = adapter.assemble(prompt, encoded, p, prompt.length)
            first = adapter.chunk_spans(0, p, chunk)[0]  # a prefill call's span of rows, as _prefill reads them
            relevance = _relevance(adapter, prompt, encoded, first[1] - first[0])
            if layer == 0:
                hidden, past_kv, scores = torch.cat([prefix.hidden, question.to(prefix.hidden.device)], dim=1), \
                    (), relevance
            else:
                probe = _probe(prompt, layer, query, p)
                cache = prefix.cache(adapter.layer_kinds, reserve=prompt.length - p)  # one copy, room for the question
                hidden = adapter.run_chunks([(p, prompt.length)], lambda a, b: question, position_ids, cache, 0, layer,
                                            probe=probe, inject=_visual_injection(prompt, encoded))
                hidden = torch.cat([prefix.hidden, hidden.to(prefix.hidden.device)], dim=1)
                past_kv, scores = cache.export(layer), _probe_scores(probe, dev)
        times["time_attention"] += times["time_question"]
    stats = {"prefix_cache": status, "prefix_tokens": p, "prefix_cache_entries": len(store),
             "prefix_cache_mib": round(store.nbytes / 2**20, 1)}
    return (encoded, hidden, past_kv, scores, relevance, position_ids), stats, calls


def _frame_times(video_info, n_frames: int):
    """The frames' times from Load Video's video_info, when it describes these frames."""
    times = getattr(video_info, "timestamps", None) if video_info is not None else None
    if times is not None and len(times) != n_frames:
        log.warning("video_info has %d frame times for %d frames; assuming the default frame rate",
                    len(times), n_frames)
        return None
    return times


def _valid_text(valid: tuple[int, ...], num_layers: int) -> str:
    return f"0 to {num_layers - 1}" if len(valid) == num_layers else ", ".join(map(str, valid))


def layer_stats(adapter, asked: int, layer: int, moved: str | None) -> dict:
    """Where the scores came from, and the Ks this model takes (hybrid models skip
    linear-attention layers: ``VideoLLMAdapter.resolve_layer``)."""
    stats = {"score_layer": f"layer {layer - 1} ({adapter.layer_kinds[layer - 1].replace('_', ' ')})" if layer
             else "text relevance before the LLM (K=0)",
             "layers_valid": _valid_text(adapter.valid_layers(), adapter.num_layers),
             "layer_default": adapter.default_layer()}
    if moved:
        stats.update(layer_asked=asked, layer_moved=moved)
    if adapter.linear_attention:
        stats["linear_kernels"] = kernels_line(model=adapter.model)
    if adapter.always_thinks:
        stats["thinking"] = ("this model's chat template always opens a thinking block (no enable_thinking "
                             "switch): its answers start with its thinking; use the Instruct model for plain answers")
    return stats


def _prefix_refusal(model, reuse_prefix: bool, prompt) -> str | None:
    """Why this call runs the whole prompt in one pass (None: the video's prefix is reused)."""
    if not reuse_prefix:
        return "not asked for"
    if getattr(model, "prefix_cache", None) is None:
        return "this model object has no prefix store"
    if model.adapter.prefix_length(prompt) == 0:
        return (f"the video's part ({prompt.after_video} tokens) is shorter than one chunk of the "
                f"linear-attention layers ({model.adapter.LINEAR_CHUNK} tokens)")
    return model.adapter.prefix_refusal


def _decode_stats(video_info, n_frames: int) -> dict:
    """How many of the frames decoded at their own times, and which came from elsewhere
    ((index, time wanted, time of the frame given)), when Load Video's video_info says."""
    own = getattr(video_info, "frames_own_time", None) if video_info is not None else None
    times = getattr(video_info, "timestamps", ())
    if own is None or len(times) != n_frames or getattr(video_info, "backend", "") == "memory":
        # frames sampled from a VIDEO already in memory were not decoded: nothing to say of them
        return {}
    return {"frames_own_time": own,
            "frames_substituted": [(k, round(want, 3), round(times[k], 3))
                                   for k, want in getattr(video_info, "frames_substituted", ())]}


def extract_attention(model: VideoLLM, frames: torch.Tensor, question: str, layer: int = 2,
                      query: str = "text", video_info=None, max_pixels: int | None = None,
                      reuse_prefix: bool = True, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                      rows: str = "auto", encoded: str = "auto", places: Places | None = None) -> AdaTPState:
    """Encode the video, run LLM layers 0..K-1 once, and score the visual tokens.

    frames: [T, H, W, 3] uint8 or float 0..1 (ComfyUI IMAGE), encoded a chunk of frames at a
        time; or a video file already encoded a chunk at a time (streaming.EncodedVideo), whose
        frames never all existed at once (its VideoInfo stands in for video_info).
    layer: K. K = 0 prunes before the LLM; its scores are the text relevance.
    query: "text" (every text token after the video) or "last" (FastV's choice).
    video_info: Load Video's VideoInfo; its frame times set the model's temporal
        positions (Qwen2.5-VL) and timestamps (Qwen3-VL). Without it the frames are
        assumed to be at transformers' default rate, and the stats say so.
    max_pixels: pixel budget per frame for dynamic-resolution models (Qwen);
        None or 0: the family's default. Fixed-resolution models ignore it.
    reuse_prefix: keep this video's question-independent part (the encoded video, and
        layers < K over every position before the question's text) in the model's
        ``prefix_cache``, and reuse it when the same frames come again with the same
        settings: a new question then runs only its own tokens. Exact: the key is the
        frames' bytes (hashed, or the digest of the same unwritten tensor object again:
        prefix_cache.FrameKeys), the video plan (size, grid, frame times), K, the pixel
        budget, the dtype and the prefix's token ids. False: one pass over the whole prompt.
        stats["prefix_cache"] says hit, miss or off (and why); stats["time_question"]
        is the question's own part, stats["time_prefix_key"] the key's.
    prefill_chunk: tokens per forward call (0: the whole prompt in one call). A longer prompt
        runs layers < K over the video's part chunk by chunk into the cache, then the
        question in one call (its scores cover every visual key), so only one chunk's
        activations exist at a time; GenerateAnswer continues from K in chunks of the same
        size. Linear-attention layers round it down to their 64-token chunks. A prompt within
        one chunk runs exactly as with 0. stats["prefill_calls"] counts the calls.
    rows: where layer K's input rows [L, D] wait for the selection: "auto", "device" or "host"
        (places.py); only the kept rows come back. stats["rows_on"] and stats["rows_reason"] say
        which and why.
    encoded: where the encoded visual rows and DeepStack's wait for the prefill: "auto", "device" or
        "host"; from the host they come to the device a prefill call's span at a time. A streamed
        video (EncodedVideo) is where encode_video put it. stats["encoded_on"] and
        stats["encoded_reason"] say which and why.
    places: the placements decided by the check before decoding (fits.check_video_fits; a streamed
        video's own, from encode_video, by default); when given, rows and encoded are not read. Else
        they are decided here, by the same planner (fits.run_places), before anything is encoded;
        layers >= K's keys and values are then placed when the answer starts. The state keeps them
        (``state.places``) for generate_answer.
    Returns a state holding the layer-K input hidden states, the KV cache of
    layers < K, the original position ids and the scores.
    """
    adapter = model.adapter
    question = check_question(question)
    streamed = isinstance(frames, EncodedVideo)
    if streamed:
        frames.check_model(adapter)
        video_info = frames.info if video_info is None else video_info
        n_frames, (width, height) = frames.num_frames, frames.frame_size
    else:
        frames = _check_frames(frames)
        n_frames, height, width = (int(x) for x in frames.shape[:3])
    if query not in QUERY_MODES:
        raise AdaTPInputError(f"query must be one of {QUERY_MODES}, got {query!r}")
    prefill_chunk = check_prefill_chunk(prefill_chunk)
    check_place("rows", rows)
    check_place("encoded", encoded)
    if places is None and streamed:
        places = frames.places
    asked = int(layer)
    layer, moved = adapter.resolve_layer(asked)  # hybrid models: K-1 must be a full-attention layer
    max_pixels = check_max_pixels(max_pixels)
    prompt = plan_prompt(adapter, question, n_frames, height, width, _frame_times(video_info, n_frames), max_pixels)
    plan = prompt.plan
    if streamed and plan != frames.plan:
        raise AdaTPInputError("this encoded video was encoded with another pixel budget or other frame times than "
                              "asked for now; encode it again with these settings")

    times: dict[str, float] = {}
    refusal = _prefix_refusal(model, reuse_prefix, prompt)
    prefix_stats = {"prefix_cache": f"off ({refusal})"} if refusal else {}
    if places is None:  # no check ran (an IMAGE, a direct call): placed now, as the check would
        places = runtime_places(adapter, prompt, layer, n_frames, (width, height), prefill_chunk, rows, encoded,
                                kept=0 if refusal else kept_prefix_bytes(model, adapter.device))
    spans = _prompt_spans(adapter, prompt, prefill_chunk)
    calls = len(spans)

    def prefill():
        nonlocal prefix_stats, calls
        if refusal:
            return _prefill(adapter, frames, prompt, layer, query, times, spans, places)
        out, prefix_stats, calls = _prefill_with_prefix(model, frames, prompt, layer, query, times,
                                                        (plan, max_pixels, adapter.dtype), prefill_chunk, places)
        return out

    with plan_free_attention(adapter.device):  # no per-shape cuDNN plans (see sdpa.py)
        # Out of memory: the model's kept static buffers and video prefixes go too (run_guarded).
        encoded_video, hidden, past_kv, scores, relevance, position_ids = run_guarded(
            prefill, "vision encoding and prefill", model=model)
    encoded_place, rows_place = places.encoded, places.rows
    if prefix_stats.get("prefix_cache") == "hit":  # where the kept prefix's rows are, whatever was planned now
        encoded_place, rows_place = (Place(t.device.type == "cpu" and adapter.device.type != "cpu", KEPT_WITH_PREFIX)
                                     for t in (encoded_video.visual, hidden))
    t, h, w = encoded_video.grid
    stats = {
        "frames": n_frames, "tokens_total": t * h * w, "tokens_kept": t * h * w,
        "layer": layer, **layer_stats(adapter, asked, layer, moved), "query": query, "prompt_tokens": prompt.length,
        "frame_size": f"{plan.size[1]}x{plan.size[0]}", "tokens_per_frame": h * w / plan.frames_per_step,
        "pixel_budget": adapter.budget_text(plan, max_pixels),
        "frames_per_step": plan.frames_per_step, "frame_times_assumed": plan.times_assumed,
        "video_streamed": streamed,
        **_decode_stats(video_info, n_frames),
        **flops_summary(model, prompt, keep_count=t * h * w, layer=layer),
        **times, **prefix_stats,
        "prefill_chunk": prefill_chunk, "prefill_calls": calls if layer else 0,
        **place_stats("rows", rows_place, place_name(hidden)),
        **place_stats("encoded", encoded_place, place_name(encoded_video.visual)),
    }
    if FALLBACK_BATCHED_VISION in adapter.fallbacks:  # this model's batched vision path failed
        stats[FALLBACK_BATCHED_VISION] = adapter.fallbacks[FALLBACK_BATCHED_VISION]
    return AdaTPState(
        model=model, question=question, prompt=prompt, layer=layer, query_mode=query,
        grid=encoded_video.grid, hidden=hidden, past_kv=past_kv, position_ids=position_ids,
        scores=scores.float(), relevance=relevance,
        frame_relevance=relevance.view(t, -1).mean(dim=1),
        frame_features=encoded_video.frame_features, segments=((0, t - 1),), stats=stats,
        injections=below_k_released(encoded_video, layer, prompt.length, prompt).injections,
        prefill_chunk=prefill_chunk, places=places,
    )
