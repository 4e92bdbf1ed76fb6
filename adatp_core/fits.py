"""Whether a question and a video fit the model, checked before any frame is decoded.

The question (``check_question``), the pixel budget (``check_max_pixels``), the prompt in the
model's context (``plan_prompt``) and the decoded frames and model input in memory
(``check_video_fits``). extract_attention runs the same checks on frames already decoded;
pipeline.py and the caption stream run them on a sampling plan, so a clip that cannot fit
fails before its decoding is paid for.
"""

from __future__ import annotations

from dataclasses import replace

from .budget import RunPlan, check_memory, run_memory
from .errors import AdaTPInputError
from .flops import LLMShape
from .models.base import MODEL_BUDGET
from .runtime import VideoLLM

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


def check_video_fits(model: VideoLLM, sample, questions, max_pixels: int | None = None, *, layer: int = 2,
                     retention: float | None = None, streamed: bool = False, chunk_frames: int | None = None,
                     prefill_chunk: int = 0, max_new_tokens: int = 0, kv: str = "auto") -> dict:
    """Before any frame is decoded: refuse a video whose sampling plan cannot fit.

    sample: a video.SamplePlan (frame count, decoded size and times, from the probe alone).
    The prompt for each question must fit the model's context (``plan_prompt``: positions for
    M-RoPE, tokens otherwise), and the run's peak (budget.run_memory: the frames, as one IMAGE or,
    streamed, a chunk at a time; one chunk's pixels and vision work; the encoded rows, the prompt's
    embeddings and layer K's input rows; layers < K's keys and values for every token and layers
    >= K's for the kept ones at ``retention``; one prefill call of ``prefill_chunk`` tokens) must fit
    in a share of the memory available now, beside the weights already loaded (budget.check_memory).
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
    vision_config = adapter.model.config.vision_config
    run = RunPlan(
        llm=LLMShape.from_config(adapter.text_model.config), vision=adapter.vision_shape(plan),
        frames=plan.num_frames, decoded=(width, height), pixels=plan.size, prompt_tokens=longest.length,
        visual_tokens=len(longest.visual_positions), layer=layer, retention=retention, streamed=streamed,
        chunk_frames=adapter.chunk_frames(plan, chunk_frames), prefill_chunk=prefill_chunk,
        frames_per_step=plan.frames_per_step, max_new_tokens=max_new_tokens,
        injections=len(getattr(vision_config, "deepstack_visual_indexes", None) or ()),
        item=adapter.dtype.itemsize, where=where, weights=weights, kv_on_host=kv == "host")
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
