"""Whether a question and a video fit the model, checked before any frame is decoded.

The question (``check_question``), the pixel budget (``check_max_pixels``), the prompt in the
model's context (``plan_prompt``) and the decoded frames and model input in memory
(``check_video_fits``). extract_attention runs the same checks on frames already decoded;
pipeline.py and the caption stream run them on a sampling plan, so a clip that cannot fit
fails before its decoding is paid for.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .budget import (DEVICE_MEMORY_SHARE, RunPlan, available_device_bytes, check_memory, prefill_parts, run_memory,
                     size_text)
from .errors import AdaTPInputError
from .flops import LLMShape
from .models.base import MODEL_BUDGET
from .runtime import VideoLLM

MIN_PIXEL_BUDGET = 28 * 28
# Tokens per forward call of the prefill (layers < K, and from K over the kept tokens). A prompt
# within one chunk runs in one call, exactly as without chunking; 8192 holds 32 frames of
# LLaVA-OneVision (6,273 tokens) and 64 frames of Qwen3-VL at 448x448 (about 6,300).
DEFAULT_PREFILL_CHUNK = 8192
MODEL_BUDGET_WIDGET = -1  # Extract Attention's max_pixels widget holds an integer: -1 means MODEL_BUDGET
MAX_QUESTION_CHARS = 100_000
# Where a run's large rows live (layer K's input rows: attention.rows_place; the encoded visual rows and
# DeepStack's: ``encoded_place``): auto (the device, or the host when the device is short), device, or host.
PLACES = ("auto", "device", "host")


def check_question(question) -> str:
    """The question as the model will see it: non-empty, not absurdly long, and
    valid UTF-8 (lone surrogates from broken clipboard text become U+FFFD)."""
    if not isinstance(question, str) or not question.strip():
        raise AdaTPInputError("the question is empty; type a question about the video")
    if len(question) > MAX_QUESTION_CHARS:
        raise AdaTPInputError(f"the question is {len(question)} characters long; the limit is "
                              f"{MAX_QUESTION_CHARS}. Shorten it.")
    return question.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def check_max_pixels(max_pixels) -> int | str | None:
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


def check_place(name: str, place) -> str:
    """A place for a run's rows (``PLACES``), else AdaTPInputError naming the setting."""
    if place not in PLACES:
        raise AdaTPInputError(f"{name} must be one of {PLACES}, got {place!r}")
    return place


def check_video_fits(model: VideoLLM, sample, questions, max_pixels: int | None = None, *, layer: int = 2,
                     retention: float | None = None, streamed: bool = False, chunk_frames: int | None = None,
                     prefill_chunk: int = 0, max_new_tokens: int = 0, encoded: str = "auto",
                     kv: str = "auto") -> dict:
    """Before any frame is decoded: refuse a video whose sampling plan cannot fit.

    sample: a video.SamplePlan (frame count, decoded size and times, from the probe alone).
    The prompt for each question must fit the model's context (``plan_prompt``: positions for
    M-RoPE, tokens otherwise), and the run's peak (budget.run_memory: the frames, as one IMAGE or,
    streamed, a chunk at a time; one chunk's pixels and vision work; the encoded rows, the prompt's
    embeddings and layer K's input rows; layers < K's keys and values for every token and layers
    >= K's for the kept ones at ``retention``; one prefill call of ``prefill_chunk`` tokens) must fit
    in a share of the memory available now, beside the weights already loaded (budget.check_memory).
    The encoded rows count on the host where they will wait there (``encoded_place`` of ``encoded``).
    kv: where layers >= K's keys and values will live while answering (generate_answer's kv): "host"
    counts them on the host (two layers' staged copies on the device); "auto", on a GPU, does so when
    the run does not fit with them on the device, as decode.kv_place will decide then.
    Raises AdaTPInputError naming the clip, the estimate and what to change; returns the planned
    figures for the stats (memory_planned_*, and memory_plan: each part, by place).
    """
    adapter = model.adapter
    max_pixels = check_max_pixels(max_pixels)
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
    on_host = encoded_place(adapter, longest, layer, prefill_chunk, encoded)[0] is not None
    run = RunPlan(
        llm=LLMShape.from_config(adapter.text_model.config), vision=adapter.vision_shape(plan),
        frames=plan.num_frames, decoded=(width, height), pixels=plan.size, prompt_tokens=longest.length,
        visual_tokens=len(longest.visual_positions), layer=layer, retention=retention, streamed=streamed,
        chunk_frames=adapter.chunk_frames(plan, chunk_frames), prefill_chunk=prefill_chunk,
        frames_per_step=plan.frames_per_step, max_new_tokens=max_new_tokens,
        injections=deepstack_layers(adapter), item=adapter.dtype.itemsize, where=where, weights=weights,
        encoded_on_host=on_host, kv_on_host=kv == "host")
    estimate = run_memory(run)
    smallest = adapter.plan_video(plan.num_frames, height, width, max_pixels=MIN_PIXEL_BUDGET)
    advice = " (num_frames, --frames)" + (" or a smaller pixel budget (max_pixels, --max-pixels)"
                                          if smallest.size != plan.size else "")
    if retention is not None and retention > 0.1:
        advice += ", a lower retention (--retention)"
    if not streamed:
        advice += ", stream the video file (Extract Attention (Video File); the CLI streams unless --no-stream)"
    try:
        check_memory(estimate, sample.name, advice=advice)
    except AdaTPInputError:
        if kv != "auto" or where == "host" or adapter.is_split:
            raise
        estimate = run_memory(replace(run, kv_on_host=True))  # what kv_place will choose when the device is short
        check_memory(estimate, sample.name, advice=advice)
    return {"prompt_tokens_planned": longest.length, **estimate.figures(), "memory_plan": estimate.breakdown()}


def prefill_memory_parts(adapter, length: int, layer: int, chunk: int, where: str) -> tuple:
    """What the prefill of layers < K holds at its peak on ``where``, for a prompt of ``length``
    tokens in calls of ``chunk`` (0: one call): budget.prefill_parts (the model run_memory uses too)
    with the text config's shapes: ((what, bytes, where), ...) for layers < K's keys and values, layer
    K's input rows [L, D], one call's working memory and the scores' rows."""
    cfg = adapter.text_model.config
    d_model = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or d_model // heads)
    inner = max(int(getattr(cfg, "intermediate_size", None) or 0),
                int(getattr(cfg, "moe_intermediate_size", None) or 0) * int(getattr(cfg, "num_experts_per_tok", 1) or 1))
    attention_layers = sum(1 for i in range(layer) if not adapter.is_linear_layer(i))
    return prefill_parts(length, attention_layers, kv_heads, head_dim, heads, d_model, inner, chunk,
                         adapter.dtype.itemsize, where, scored=bool(layer))


def place_name(t: torch.Tensor) -> str:
    """Where a tensor is, for the stats (rows_on, encoded_on): "host", or the device's name."""
    return "host" if t.device.type == "cpu" else str(t.device)


def deepstack_layers(adapter) -> int:
    """How many DeepStack rows the vision side gives per visual token (Qwen3-VL's; 0 elsewhere)."""
    vision_config = getattr(adapter.model.config, "vision_config", None)
    return len(getattr(vision_config, "deepstack_visual_indexes", None) or ())


def encoded_place(adapter, prompt, layer: int, chunk: int, encoded: str = "auto",
                  available=available_device_bytes) -> tuple[torch.device | None, str]:
    """(where the video's encoded rows [N, D] and DeepStack's rows wait for the prefill: None for the
    device's own memory, or the host; why), decided before anything is encoded, for ``prompt`` (its
    length and visual tokens) with layers < K run in calls of ``chunk`` tokens (0: one call).

    auto: the device, unless those rows and the prefill (``prefill_memory_parts``) are above
    DEVICE_MEMORY_SHARE of what the device has free now; then the host: the rows are written there
    chunk by chunk as they are encoded (pinned, for a GPU), and come to the device a prefill call's
    span at a time; the kept tokens' DeepStack rows of layers >= K are gathered there. A CPU model's
    rows are on the host anyway; "host" on the CPU takes the host's path over the same memory.
    available(device) -> free bytes or None (unknown: the device)."""
    check_place("encoded", encoded)
    dev = adapter.device
    if encoded == "host":
        return torch.device("cpu"), "asked for"
    if dev.type == "cpu":
        return None, "the model runs on the host"
    if encoded == "device":
        return None, "asked for"
    have = available(dev)
    if have is None:
        return None, "the device's free memory is unknown"
    n = len(prompt.visual_positions)
    rows = n * int(adapter.text_model.config.hidden_size) * adapter.dtype.itemsize * (1 + deepstack_layers(adapter))
    need = rows + sum(b for _, b, _ in prefill_memory_parts(adapter, prompt.length, layer, chunk, str(dev)))
    what = "the encoded rows" + (" and DeepStack's" if deepstack_layers(adapter) else "")
    if need <= int(have * DEVICE_MEMORY_SHARE):
        return None, f"{what} and the prefill need about {size_text(need)} of {size_text(have)} free"
    return torch.device("cpu"), (f"the device is short: {what} and the prefill need about {size_text(need)} of "
                                 f"{size_text(have)} free; {what} ({size_text(rows)}) wait on the host and come to "
                                 "the device a prefill call's span at a time")
