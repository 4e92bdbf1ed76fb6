"""Step 2: text->visual attention at layer K-1, from a partial prefill.

The score comes from the attention function itself (hf/attention_hook.py):
a per-call ``AttentionProbe`` asks one layer's attention call to score the query
rows on the visual keys, with the rotated queries and keys that the layer uses.
"""

from __future__ import annotations

import logging

import torch

from .debias import text_relevance
from .errors import AdaTPEnvironmentError, AdaTPInputError
from .flops import flops_summary
from .budget import RunPlan, check_memory, run_memory
from .memory import run_guarded
from .hf.cache import KVCache
from .prefix_cache import FrozenPrefix
from .hf.attention_hook import aligns_causal_to_the_end
from .hf.layers import module_device
from .models.base import FALLBACK_BATCHED_VISION, MODEL_BUDGET, AttentionProbe, Injection
from .hf.kernels import kernels_line
from .models.loader import VideoLLM
from .sdpa import plan_free_attention
from .state import AdaTPState
from .streaming import EncodedVideo
from .timing import timed

log = logging.getLogger(__name__)

QUERY_MODES = ("text", "last")
MIN_PIXEL_BUDGET = 28 * 28
MODEL_BUDGET_WIDGET = -1  # Extract Attention's max_pixels widget holds an integer: -1 means MODEL_BUDGET
MAX_QUESTION_CHARS = 100_000


def check_question(question) -> str:
    """The question as the model will see it: non-empty, not absurdly long, and
    valid UTF-8 (lone surrogates from broken clipboard text become U+FFFD)."""
    if not isinstance(question, str) or not question.strip():
        raise AdaTPInputError("the question is empty; type a question about the video")
    if len(question) > MAX_QUESTION_CHARS:
        raise AdaTPInputError(f"the question is {len(question)} characters long; the limit is "
                              f"{MAX_QUESTION_CHARS}. Shorten it.")
    return question.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _check_frames(frames) -> torch.Tensor:
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise AdaTPInputError(f"frames must be an IMAGE batch [T, H, W, 3], got {shape}")
    if frames.shape[0] < 1:
        raise AdaTPInputError("no frames were given; load at least one frame")
    return frames


def _encode(adapter, frames, prompt, times: dict):
    """The video's Encoded: a streamed video's (encoded before, streaming.encode_video), or the
    frames' encoded a chunk at a time (``encode_frames``)."""
    if isinstance(frames, EncodedVideo):
        times.setdefault("time_preprocess", 0.0)
        times.setdefault("time_vision", 0.0)
        return frames.encoded
    return adapter.encode_frames(frames, prompt.plan, times)


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


def _prefill(adapter, frames, prompt, layer: int, query: str, times: dict):
    """Vision encoder, prompt assembly, layers 0..K-1 and the scores in one pass over the
    whole prompt (see extract_attention): the path when no prefix is reused."""
    dev = adapter.device
    with torch.inference_mode():
        encoded = _encode(adapter, frames, prompt, times)
        with timed(times, "time_attention", dev):
            embeds = adapter.assemble(prompt, encoded)
            position_ids = adapter.position_ids(prompt)
            q_start, q_end = prompt.question
            relevance = text_relevance(encoded.visual, embeds[0, q_start:q_end])
            if layer == 0:
                return encoded, embeds, (), relevance, relevance, position_ids
            probe = _probe(prompt, layer, query, 0)
            cache = KVCache(adapter.layer_kinds)
            hidden = adapter.run_layers(embeds, position_ids, cache, 0, layer, probe=probe,
                                        inject=_injection(prompt, encoded, 0, prompt.length))
            return encoded, hidden, cache.export(layer), _probe_scores(probe, dev), relevance, position_ids


def _injection(prompt, encoded, start: int, stop: int) -> Injection | None:
    """DeepStack's features for the visual rows among positions [start, stop), as rows of a
    forward call over those positions (None when there are none)."""
    if not encoded.injections:
        return None
    inside = (prompt.visual_positions >= start) & (prompt.visual_positions < stop)
    if bool(inside.all()):  # every visual row (the whole prompt, or a prefix holding the video): no copy
        return Injection(prompt.visual_positions - start, encoded.injections)
    if not bool(inside.any()):
        return None
    rows = prompt.visual_positions[inside] - start
    return Injection(rows, tuple(f[inside.to(f.device)] for f in encoded.injections))


def _video_prefix(adapter, prompt, encoded, layer: int, position_ids, p: int) -> FrozenPrefix:
    """Layers 0..K-1 over the question-independent positions [0, p) (``prefix_length``)."""
    embeds = adapter.assemble(prompt, encoded)[:, :p].clone()
    if layer == 0:
        return FrozenPrefix(encoded, (), embeds)
    cache = KVCache(adapter.layer_kinds)
    hidden = adapter.run_layers(embeds, position_ids[..., :p], cache, 0, layer,
                                inject=_injection(prompt, encoded, 0, p))
    return FrozenPrefix(encoded, cache.export(layer), hidden)


def _prefill_with_prefix(model, frames, prompt, layer: int, query: str, times: dict, key_parts: tuple):
    """``_prefill``'s results in two parts: the video's prefix (from the model's store when
    these frames were seen with these settings, else computed and stored), then the
    rest [p, L) through layers < K, attending to the prefix. p is the adapter's
    ``prefix_length``: where the question's text starts (after_video), or before it.
    Returns _prefill's tuple and the prefix's stats."""
    adapter, store = model.adapter, model.prefix_cache
    dev = adapter.device
    p = adapter.prefix_length(prompt)
    with torch.inference_mode():
        with timed(times, "time_prefix_key"):
            store.check_weights(adapter.model)
            key = (_frames_key(store, frames), *key_parts, layer, tuple(prompt.input_ids[:p].tolist()))
            prefix = store.get(key)
        status = "hit" if prefix is not None else "miss"
        times.setdefault("time_preprocess", 0.0)
        times.setdefault("time_vision", 0.0)
        with timed(times, "time_attention", dev):
            position_ids = adapter.position_ids(prompt)
        if prefix is None:
            encoded = _encode(adapter, frames, prompt, times)
            with timed(times, "time_attention", dev):
                prefix = _video_prefix(adapter, prompt, encoded, layer, position_ids, p)
            not_kept = store.put(key, prefix)
            if not_kept:
                status = f"miss ({not_kept})"
        with timed(times, "time_question", dev):
            encoded = prefix.encoded
            if p == prompt.after_video:  # the question's part is text: no video to scatter in
                question = adapter.embed_tokens(prompt.input_ids[p:]).unsqueeze(0)
            else:
                question = adapter.assemble(prompt, encoded)[:, p:]
            q_start, q_end = prompt.question
            relevance = text_relevance(encoded.visual, question[0, q_start - p:q_end - p])
            if layer == 0:
                hidden, past_kv, scores = torch.cat([prefix.hidden, question], dim=1), (), relevance
            else:
                probe = _probe(prompt, layer, query, p)
                n = prompt.length - p
                cache = prefix.cache(adapter.layer_kinds, reserve=n)  # one copy, room for the question
                masks = None
                if not aligns_causal_to_the_end(adapter.text_model.config):
                    masks = prefix.masks(n, [module_device(adapter.text_model.layers[i]) for i in range(layer)])
                hidden = adapter.run_layers(question, position_ids[..., p:], cache, 0, layer, probe=probe,
                                            masks=masks, inject=_injection(prompt, encoded, p, prompt.length))
                hidden = torch.cat([prefix.hidden, hidden.to(prefix.hidden.device)], dim=1)
                past_kv, scores = cache.export(layer), _probe_scores(probe, dev)
        times["time_attention"] += times["time_question"]
    stats = {"prefix_cache": status, "prefix_tokens": p, "prefix_cache_entries": len(store),
             "prefix_cache_mib": round(store.nbytes / 2**20, 1)}
    return (encoded, hidden, past_kv, scores, relevance, position_ids), stats


def _check_max_pixels(max_pixels) -> int | str | None:
    """None (0: the pack's default), MODEL_BUDGET ("model", or -1 from a node's widget: the model's
    video processor's own budget), or pixels per frame."""
    if max_pixels is None or max_pixels == 0:
        return None
    if max_pixels in (MODEL_BUDGET, MODEL_BUDGET_WIDGET) and not isinstance(max_pixels, bool):
        return MODEL_BUDGET
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < MIN_PIXEL_BUDGET:
        raise AdaTPInputError(f"max_pixels must be 0 (the pack's default, 448x448 per frame), 'model' (-1 on the "
                              f"node: the model's own video budget) or an integer of at least {MIN_PIXEL_BUDGET} "
                              f"pixels per frame, got {max_pixels!r}")
    return max_pixels


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


def plan_prompt(adapter, question: str, n_frames: int, height: int, width: int, times=None,
                max_pixels: int | None = None):
    """The prompt ``extract_attention`` builds for n_frames frames of height x width (a Prompt whose
    ``plan`` is the video plan), checked against the model's context. Needs no frames: the check
    before decoding (``check_video_fits``) builds the same prompt from a sampling plan."""
    plan = adapter.plan_video(n_frames, height, width, times=times, max_pixels=max_pixels)
    prompt = adapter.build_prompt(question, plan)
    if prompt.question[1] == prompt.question[0]:
        raise AdaTPInputError("the question has no tokens; type a question about the video")
    adapter.check_context(prompt)
    return prompt


def check_video_fits(model: VideoLLM, sample, questions, max_pixels: int | None = None, *, layer: int = 2,
                     retention: float | None = None, streamed: bool = False, chunk_frames: int | None = None,
                     prefill_chunk: int = 0, max_new_tokens: int = 0) -> dict:
    """Before any frame is decoded: refuse a video whose sampling plan cannot fit.

    sample: a video.SamplePlan (frame count, decoded size and times, from the probe alone).
    The prompt for each question must fit the model's context (``plan_prompt``: positions for
    M-RoPE, tokens otherwise), and the run's peak (budget.run_memory: the frames, as one IMAGE or,
    streamed, a chunk at a time; one chunk's pixels and vision work; the encoded rows, the prompt's
    embeddings and layer K's input rows; layers < K's keys and values for every token and layers
    >= K's for the kept ones at ``retention``; one prefill call of ``prefill_chunk`` tokens) must fit
    in a share of the memory available now, beside the weights already loaded (budget.check_memory).
    Raises AdaTPInputError naming the clip, the estimate and what to change; returns the planned
    figures for the stats (memory_planned_*, and memory_plan: each part, by place).
    """
    from .flops import LLMShape

    adapter = model.adapter
    max_pixels = _check_max_pixels(max_pixels)
    width, height = sample.size
    try:
        longest = max((plan_prompt(adapter, check_question(q), sample.num_frames, height, width,
                                   sample.clip_times(), max_pixels) for q in questions),
                      key=lambda p: p.length)
    except AdaTPInputError as exc:
        raise AdaTPInputError(f"{sample.name}: {exc} Nothing was decoded.") from exc
    plan = longest.plan
    layer = adapter.resolve_layer(int(layer))[0]
    device = adapter.device
    where = "host" if device.type == "cpu" else str(device)
    weights = sum(t.numel() * t.element_size() for t in (*adapter.model.parameters(), *adapter.model.buffers())
                  if t.device == device)
    vision_config = adapter.model.config.vision_config
    estimate = run_memory(RunPlan(
        llm=LLMShape.from_config(adapter.text_model.config), vision=adapter.vision_shape(plan),
        frames=plan.num_frames, decoded=(width, height), pixels=plan.size, prompt_tokens=longest.length,
        visual_tokens=len(longest.visual_positions), layer=layer, retention=retention, streamed=streamed,
        chunk_frames=adapter.chunk_frames(plan, chunk_frames), prefill_chunk=prefill_chunk,
        frames_per_step=plan.frames_per_step, max_new_tokens=max_new_tokens,
        injections=len(getattr(vision_config, "deepstack_visual_indexes", None) or ()),
        item=adapter.dtype.itemsize, where=where, weights=weights))
    smallest = adapter.plan_video(plan.num_frames, height, width, max_pixels=MIN_PIXEL_BUDGET)
    advice = " (num_frames, --frames)" + (" or a smaller pixel budget (max_pixels, --max-pixels)"
                                          if smallest.size != plan.size else "")
    if retention is not None and retention > 0.1:
        advice += ", a lower retention (--retention)"
    if not streamed:
        advice += ", stream the video file (Extract Attention (Video File); the CLI streams unless --no-stream)"
    check_memory(estimate, sample.name, advice=advice)
    return {"prompt_tokens_planned": longest.length, **estimate.figures(), "memory_plan": estimate.breakdown()}


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
                      reuse_prefix: bool = True) -> AdaTPState:
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
    asked = int(layer)
    layer, moved = adapter.resolve_layer(asked)  # hybrid models: K-1 must be a full-attention layer
    max_pixels = _check_max_pixels(max_pixels)
    prompt = plan_prompt(adapter, question, n_frames, height, width, _frame_times(video_info, n_frames), max_pixels)
    plan = prompt.plan
    if streamed and plan != frames.plan:
        raise AdaTPInputError("this encoded video was encoded with another pixel budget or other frame times than "
                              "asked for now; encode it again with these settings")

    times: dict[str, float] = {}
    refusal = _prefix_refusal(model, reuse_prefix, prompt)
    prefix_stats = {"prefix_cache": f"off ({refusal})"} if refusal else {}

    def prefill():
        nonlocal prefix_stats
        if refusal:
            return _prefill(adapter, frames, prompt, layer, query, times)
        out, prefix_stats = _prefill_with_prefix(model, frames, prompt, layer, query, times,
                                                 (plan, max_pixels, adapter.dtype))
        return out

    with plan_free_attention(adapter.device):  # no per-shape cuDNN plans (see sdpa.py)
        # Out of memory: the model's kept static buffers and video prefixes go too (run_guarded).
        encoded, hidden, past_kv, scores, relevance, position_ids = run_guarded(
            prefill, "vision encoding and prefill", model=model)
    t, h, w = encoded.grid
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
    }
    if FALLBACK_BATCHED_VISION in adapter.fallbacks:  # this model's batched vision path failed
        stats[FALLBACK_BATCHED_VISION] = adapter.fallbacks[FALLBACK_BATCHED_VISION]
    return AdaTPState(
        model=model, question=question, prompt=prompt, layer=layer, query_mode=query,
        grid=encoded.grid, hidden=hidden, past_kv=past_kv, position_ids=position_ids,
        scores=scores.float(), relevance=relevance,
        frame_relevance=relevance.view(t, -1).mean(dim=1),
        frame_features=encoded.frame_features, segments=((0, t - 1),), stats=stats,
        injections=encoded.injections,
    )
