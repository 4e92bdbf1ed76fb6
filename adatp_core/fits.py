"""Whether a question and a video fit the model, checked before any frame is decoded.

The question (``check_question``), the pixel budget (``check_max_pixels``), the prompt in the
model's context (``plan_prompt``) and the run's peak memory (``check_video_fits``), which also places
the run's rows and keys and values (``run_places``: places.plan_places over budget.run_memory).
extract_attention runs the same checks on frames already decoded (and, where no check ran, places
them the same way); pipeline.py, the CLI, the Video File node and the caption stream run them on a
sampling plan, so a clip that cannot fit fails before its decoding is paid for.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import budget
from .budget import DEVICE_MEMORY_SHARE, RunPlan, check_memory, run_memory, size_text
from .errors import AdaTPInputError
from .flops import LLMShape
from .models.base import MODEL_BUDGET
from .places import WHAT, Place, Places, check_place, plan_places
from .runtime import VideoLLM

MIN_PIXEL_BUDGET = 28 * 28
# Tokens per forward call of the prefill (layers < K, and from K over the kept tokens). A prompt
# within one chunk runs in one call, exactly as without chunking; 8192 holds 32 frames of
# LLaVA-OneVision (6,273 tokens) and 64 frames of Qwen3-VL at 448x448 (about 6,300).
DEFAULT_PREFILL_CHUNK = 8192
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


@dataclass(frozen=True)
class FitCheck:
    """What the check before decoding found: the planned figures for the stats (memory_planned_*,
    memory_plan: each part, by place; prompt_tokens_planned) and where the run's rows and keys and
    values live (places.Places), which encode_video, extract_attention and generate_answer then use."""

    figures: dict
    places: Places


def run_plan(adapter, prompt, layer: int, *, frames: int, decoded: tuple[int, int], retention: float | None = 1.0,
             streamed: bool = False, chunk_frames: int | None = None, prefill_chunk: int = 0,
             max_new_tokens: int = 0) -> RunPlan:
    """The budget.RunPlan of ``prompt`` (its video plan, length and visual tokens) on ``adapter``'s model
    at K = ``layer`` (resolved), with nothing placed on the host yet (``run_places`` decides)."""
    plan = prompt.plan
    device = adapter.device
    weights = sum(t.numel() * t.element_size() for t in (*adapter.model.parameters(), *adapter.model.buffers())
                  if t.device == device)
    return RunPlan(
        llm=LLMShape.from_config(adapter.text_model.config), vision=adapter.vision_shape(plan),
        frames=frames, decoded=decoded, pixels=plan.size, prompt_tokens=prompt.length,
        visual_tokens=len(prompt.visual_positions), layer=layer, retention=retention, streamed=streamed,
        chunk_frames=adapter.chunk_frames(plan, chunk_frames), prefill_chunk=prefill_chunk,
        frames_per_step=plan.frames_per_step, max_new_tokens=max_new_tokens,
        injections=deepstack_layers(adapter), item=adapter.dtype.itemsize, where=place_of(device),
        weights=weights)


def placed(run: RunPlan, on_host: frozenset) -> RunPlan:
    """``run`` with the names in ``on_host`` (places.MOVES) on the host."""
    return replace(run, encoded_on_host="encoded" in on_host, rows_on_host="rows" in on_host,
                   kv_on_host="kv" in on_host)


def kept_prefix_bytes(model, device) -> int:
    """Device bytes the kept video prefixes of ``model`` (a VideoLLM) hold on ``device`` that a question over
    one allocates none of again (their encoded rows: PrefixStore.reused_bytes_on; it copies their keys and
    values and rows, which the estimate counts), and that a run which misses gets back (the store's prefixes
    are dropped before it allocates when its plan counted them: Places.kept; run_guarded drops them on
    running out of memory)."""
    store = getattr(model, "prefix_cache", None)
    if store is None or device.type == "cpu":
        return 0
    return store.reused_bytes_on(place_of(device))


def run_places(adapter, run: RunPlan, encoded="auto", rows="auto", kv="auto", kept: int = 0) -> Places:
    """places.plan_places over budget.run_memory of ``run``, against the free memory of ``adapter``'s
    device and of the host now (budget.available_device_bytes, available_host_bytes: what check_memory
    reads too), plus ``kept`` (kept_prefix_bytes): the one decision, made by the check before decoding, or
    where none ran, when the prefill starts. Places.kept says whether the plan needed the kept bytes."""
    device = adapter.device
    free = None if device.type == "cpu" else budget.available_device_bytes(device)
    estimate = lambda on_host: run_memory(placed(run, on_host))  # noqa: E731
    host_free = budget.available_host_bytes()
    places = plan_places(estimate, run.where, free, split=adapter.is_split, host_free=host_free,
                         encoded=encoded, rows=rows, kv=kv)
    if free is None or kept <= 0:
        return places
    if estimate(places.on_host()).bytes_on(run.where) <= int(free * DEVICE_MEMORY_SHARE):
        return places  # fits without them: a miss keeps them
    with_kept = plan_places(estimate, run.where, free + kept, split=adapter.is_split, host_free=host_free,
                            encoded=encoded, rows=rows, kv=kv)
    return replace(with_kept, kept=kept)


def check_video_fits(model: VideoLLM, sample, questions, max_pixels: int | None = None, *, layer: int = 2,
                     retention: float | None = None, streamed: bool = False, chunk_frames: int | None = None,
                     prefill_chunk: int = 0, max_new_tokens: int = 0, encoded: str = "auto", rows: str = "auto",
                     kv: str = "auto") -> FitCheck:
    """Before any frame is decoded: refuse a video whose sampling plan cannot fit, and place the run's rows
    and keys and values.

    sample: a video.SamplePlan (frame count, decoded size and times, from the probe alone).
    The prompt for each question must fit the model's context (``plan_prompt``: positions for
    M-RoPE, tokens otherwise), and the run's peak (budget.run_memory: the frames, as one IMAGE or,
    streamed, a chunk at a time; one chunk's pixels and vision work; the encoded rows, the prompt's
    embeddings and layer K's input rows; layers < K's keys and values for every token, the answer's copy
    of them and layers >= K's for the kept ones at ``retention`` (None: none pruned); one prefill call of
    ``prefill_chunk`` tokens) must fit in a share of the memory available now, beside the weights
    already loaded (budget.check_memory), with the encoded rows, layer K's rows and layers >= K's keys
    and values where places.plan_places puts them (encoded, rows, kv: "auto", "device" or "host").
    Raises AdaTPInputError naming the clip, the estimate and what to change; returns a FitCheck.
    """
    adapter = model.adapter
    max_pixels = check_max_pixels(max_pixels)
    for name, value in (("encoded", encoded), ("rows", rows), ("kv", kv)):
        check_place(name, value)
    width, height = sample.size
    questions = list(questions)
    if not questions:
        raise AdaTPInputError(f"{sample.name}: no question to check the video for; give at least one question. "
                              "Nothing was decoded.")
    try:
        longest = max((plan_prompt(adapter, check_question(q), sample.num_frames, height, width,
                                   sample.clip_times(), max_pixels) for q in questions),
                      key=lambda p: p.length)
    except AdaTPInputError as exc:
        raise AdaTPInputError(f"{sample.name}: {exc} Nothing was decoded.") from exc
    plan = longest.plan
    layer = adapter.resolve_layer(int(layer))[0]
    run = run_plan(adapter, longest, layer, frames=plan.num_frames, decoded=(width, height),
                   retention=1.0 if retention is None else retention, streamed=streamed, chunk_frames=chunk_frames,
                   prefill_chunk=prefill_chunk, max_new_tokens=max_new_tokens)
    places = run_places(adapter, run, encoded, rows, kv, kept=kept_prefix_bytes(model, adapter.device))
    estimate = run_memory(placed(run, places.on_host()))
    smallest = adapter.plan_video(plan.num_frames, height, width, max_pixels=MIN_PIXEL_BUDGET)
    advice = " (num_frames, --frames)" + (" or a smaller pixel budget (max_pixels, --max-pixels)"
                                          if smallest.size != plan.size else "")
    if retention is not None and retention > 0.1:
        advice += ", a lower retention (--retention)"
    if not streamed:
        advice += ", stream the video file (Extract Attention (Video File); the CLI streams unless --no-stream)"
    advice += _placement_advice(adapter, run, places, estimate, {"encoded": encoded, "rows": rows, "kv": kv})
    check_memory(estimate, sample.name, advice=advice, available=_with_kept(places.kept))
    return FitCheck({"prompt_tokens_planned": longest.length, **estimate.figures(),
                     "memory_plan": estimate.breakdown()}, places)


# A prefill call's own working memory (budget.run_memory's parts): a smaller --prefill-chunk lowers it.
PREFILL_CALL = "one prefill call's"
PREFILL_CALL_SHARE = 0.25  # of the device's estimate, from which the advice names --prefill-chunk


def _placement_advice(adapter, run: RunPlan, places: Places, estimate, asked: dict) -> str:
    """What check_memory's refusal adds about the placements, where the device is short: the ones asked for
    the device that auto would move to the host for the run to fit there (auto or host), and a smaller
    prefill call where one is a large part of the estimate. "" where the device is not short."""
    where = run.where
    free = None if where == "host" else budget.available_device_bytes(adapter.device)
    if free is None:
        return ""
    limit = int((free + places.kept) * DEVICE_MEMORY_SHARE)
    need = estimate.bytes_on(where)
    if need <= limit:
        return ""
    advice = ""
    forced = [name for name, value in asked.items() if value == "device" and not getattr(places, name).host]
    if forced and not adapter.is_split:
        relaxed = {name: "auto" if name in forced else value for name, value in asked.items()}
        moved = run_places(adapter, run, **relaxed, kept=places.kept)
        to_host = [n for n in forced if getattr(moved, n).host]
        if to_host and run_memory(placed(run, moved.on_host())).bytes_on(where) <= limit:
            advice += (", put " + " and ".join(WHAT[n] for n in to_host) + " on the host ("
                       + ", ".join(f"{n} auto or host, --{n} auto" for n in to_host) + ": the run fits then)")
    prefill = sum(b for what, b, w in estimate.parts + estimate.fixed if w == where and what.startswith(PREFILL_CALL))
    if prefill > PREFILL_CALL_SHARE * need:
        advice += f", a smaller prefill call (--prefill-chunk: its working memory is {size_text(prefill)} of it)"
    return advice


def _with_kept(kept: int):
    """check_memory's available(where): its default, plus ``kept`` on a device (Places.kept)."""
    if not kept:
        return None

    def available(where):
        have = budget.available_bytes(where)
        return have if where == "host" or have is None else have + kept

    return available


def place_of(device) -> str:
    """A device's name in the memory model: "host" for the CPU, else the device (``cuda:0``)."""
    return "host" if device.type == "cpu" else str(device)


def place_name(t) -> str:
    """Where a tensor is, for the stats (rows_on, encoded_on): "host", or the device's name."""
    return place_of(t.device)


def deepstack_layers(adapter) -> int:
    """How many DeepStack rows per visual token the vision side gives (Qwen3-VL's; 0 elsewhere)."""
    vision_config = getattr(adapter.model.config, "vision_config", None)
    return len(getattr(vision_config, "deepstack_visual_indexes", None) or ())


def runtime_places(adapter, prompt, layer: int, n_frames: int, decoded: tuple[int, int], prefill_chunk: int,
                   rows: str = "auto", encoded: str = "auto", kept: int = 0) -> Places:
    """Where no check before decoding ran: the encoded rows and layer K's rows placed by the check's
    planner (fits.run_places) for ``prompt`` as it will run, with nothing pruned yet known. Layers >= K's
    keys and values count at their smallest here (homed on the host, two staged layers): the answer
    places them when it starts, knowing the kept tokens (``Places.kv`` None)."""
    run = run_plan(adapter, prompt, layer, frames=n_frames, decoded=decoded, streamed=True,
                   prefill_chunk=prefill_chunk)
    return replace(run_places(adapter, run, encoded, rows, kv=Place(True, ""), kept=kept), kv=None)
