"""All stages in one call, for the command line, the tests and the benchmark.

It only composes the stages' public functions, in the order the default
workflow wires them, so the ComfyUI graph and the command line cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import DEFAULT_PREFILL_CHUNK, QUERY_MODES, extract_attention
from .debias import global_debias, local_debias
from .errors import AdaTPInputError, OptionError
from .memory import release_pinned
from .fits import FitCheck, check_max_pixels, check_video_fits
from .generate import Answer, SamplingConfig, generate_answer
from .models.base import MODEL_BUDGET
from .peak_memory import stage_peak
from .places import MOVES, Places, check_place
from .prune import check_retention, prune_tokens
from .runtime import VideoLLM
from .state import AdaTPState
from .streaming import STREAM_BACKEND, EncodedVideo, encode_video
from .timing import timed
from .video import (DECODE_MAX_SIDE, MAX_FRAMES, SAMPLING_MODES, ProcessorSampling, VideoInfo, decode_plan,
                    frames_to_image, plan_sampling)


@dataclass(frozen=True)
class PipelineConfig:
    """Every stage's settings. retention None skips pruning (the vanilla model);
    global_debias / local_debias False leave those stages out of the graph."""

    num_frames: int = 32
    sampling: str | ProcessorSampling = "uniform"  # video.sample_times: a mode, a preset or a processor's
    fps: float = 1.0
    start_time: float = 0.0
    end_time: float = 0.0
    layer: int = 2
    query: str = "text"
    max_pixels: int | str = 0  # pixel budget per frame for Qwen models (0: the pack's default; "model")
    global_debias: bool = True
    segment_threshold: float = 0.95
    relevance_boost: float = 1.0
    local_debias: bool = True
    max_per_position: int = 1
    retention: float | None = 0.25
    generation: SamplingConfig = field(default_factory=SamplingConfig)
    reuse_prefix: bool = True  # keep the video's prefix for the next question (attention.py)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # tokens per forward call of the prefill (0: one call; attention.py)
    # A video file is decoded, preprocessed and encoded a chunk of frames at a time (streaming.py): all its
    # frames never exist at once. False: decoded into one IMAGE first (what the ComfyUI graph does).
    stream: bool = True
    chunk_frames: int | None = None  # frames per vision chunk (None: the adapter's FRAMES_PER_CHUNK)
    # Where the encoded visual rows and DeepStack's wait for the prefill, where layers >= K keep their keys and
    # values while answering, and where layer K's input rows wait for the selection: auto (the device, or the
    # host when it is short: places.plan_places, in the check before decoding), device or host.
    encoded: str = "auto"
    kv: str = "auto"
    rows: str = "auto"


def check_option(option: str, check, value) -> None:
    """check(value); the AdaTPInputError it raises becomes an OptionError naming ``option``."""
    try:
        check(value)
    except AdaTPInputError as exc:
        raise OptionError(option, str(exc)) from exc


def _check_frames(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_FRAMES:
        raise AdaTPInputError(f"frames must be an integer from 1 to {MAX_FRAMES}, got {n!r} (32 is usual)")


def _check_layer(layer) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise AdaTPInputError(f"layer must be an integer >= 0, got {layer!r} (2 is usual)")


def _check_choice(name: str, choices):
    def check(value) -> None:
        if value not in choices:
            raise AdaTPInputError(f"{name} must be one of {choices}, got {value!r}")
    return check


def check_config(cfg: PipelineConfig) -> None:
    """The settings that can be checked without the model (frames, sampling, query, retention,
    layer, pixel budget), so that a bad one stops a run before the model loads. Raises
    OptionError naming the setting."""
    for option, check, value in (
            ("frames", _check_frames, cfg.num_frames), ("sampling", _check_choice("sampling", SAMPLING_MODES), cfg.sampling),
            ("query", _check_choice("query", QUERY_MODES), cfg.query),
            ("retention", lambda v: v is None or check_retention(v), cfg.retention),
            ("layer", _check_layer, cfg.layer), ("max_pixels", check_max_pixels, cfg.max_pixels)):
        check_option(option, check, value)
    check_places(cfg)


def check_places(cfg: PipelineConfig) -> None:
    """The three placements (encoded, rows, kv: places.PLACES), each an OptionError naming it: checked
    with the other settings, and by run_pipeline before any work."""
    for name in MOVES:
        check_option(name, lambda v, name=name: check_place(name, v), getattr(cfg, name))


@dataclass(frozen=True)
class PipelineResult:
    answer: Answer
    state: AdaTPState
    video: VideoInfo | None
    stats: dict


def select(state: AdaTPState, cfg: PipelineConfig) -> AdaTPState:
    """Steps 1 and 3-5, as configured."""
    if cfg.retention is None:
        return state
    if cfg.global_debias:
        state = global_debias(state, cfg.segment_threshold, cfg.relevance_boost)
    if cfg.local_debias:
        state = local_debias(state, cfg.max_per_position)
    return prune_tokens(state, cfg.retention)


def prefill(model: VideoLLM, frames: torch.Tensor, question: str, cfg: PipelineConfig, video_info=None,
            places: Places | None = None) -> AdaTPState:
    """Every stage before GenerateAnswer: the partial prefill (placed as ``places`` says, the check
    before decoding's; else as extract_attention decides), then the selection."""
    state = extract_attention(model, frames, question, cfg.layer, cfg.query, video_info=video_info,
                              max_pixels=cfg.max_pixels, reuse_prefix=cfg.reuse_prefix,
                              prefill_chunk=cfg.prefill_chunk, rows=cfg.rows, encoded=cfg.encoded, places=places)
    return select(state, cfg)


def decode_side(max_pixels) -> int | None:
    """The longest side frames are decoded at for this pixel budget: the model's own budget is the
    processor's on the frames as stored, so they are decoded at full size (None: within video.py's
    limits); every other budget fits in DECODE_MAX_SIDE."""
    return None if check_max_pixels(max_pixels) == MODEL_BUDGET else DECODE_MAX_SIDE


def check_fits(model: VideoLLM, sample, questions, cfg: PipelineConfig, streamed: bool) -> FitCheck:
    """check_video_fits with every setting of ``cfg`` that the run's peak depends on (K, retention, the
    vision and prefill chunks, the answer's length, the three placements): the planned figures and
    places, or AdaTPInputError before any frame is decoded."""
    return check_video_fits(model, sample, questions, cfg.max_pixels, layer=cfg.layer, retention=cfg.retention,
                            streamed=streamed, chunk_frames=cfg.chunk_frames, prefill_chunk=cfg.prefill_chunk,
                            max_new_tokens=cfg.generation.max_new_tokens, encoded=cfg.encoded, rows=cfg.rows,
                            kv=cfg.kv)


def _checked_plan(model: VideoLLM, path, questions, cfg: PipelineConfig, streamed: bool):
    """The sampling plan of the video at ``path``, checked against the model's context with each
    question and against memory (the run's peak, streamed or not) before any frame is decoded
    (check_video_fits). Returns (SamplePlan, FitCheck)."""
    sample = plan_sampling(path, cfg.num_frames, cfg.sampling, cfg.fps, cfg.start_time, cfg.end_time,
                           decode_side(cfg.max_pixels))
    return sample, check_fits(model, sample, questions, cfg, streamed)


def load_checked(model: VideoLLM, path, questions, cfg: PipelineConfig):
    """Sample and decode the video at ``path`` for ``model``, checked before any frame is decoded
    (_checked_plan). Returns (frames [T, H, W, 3] float32, VideoInfo, FitCheck: pass its places on)."""
    sample, fit = _checked_plan(model, path, questions, cfg, streamed=False)
    # the stream's decoder: decord and PyAV scale a frame decoded smaller differently (a 720p source at
    # the 1024-px decode side differs by up to 38 levels), so one pass and streamed must share one
    frames, info = decode_plan(sample, STREAM_BACKEND)
    return frames_to_image(frames), info, fit


def stream_checked(model: VideoLLM, path, questions, cfg: PipelineConfig):
    """Sample the video at ``path``, checked before any frame is decoded (_checked_plan), then decode,
    preprocess and encode it a chunk of frames at a time (streaming.encode_video), placed as the check says
    (the EncodedVideo keeps its places for extract_attention).
    Returns (EncodedVideo, VideoInfo, planned figures and the encode's times)."""
    sample, fit = _checked_plan(model, path, questions, cfg, streamed=True)
    video = encode_video(model, sample, cfg.max_pixels, cfg.chunk_frames, layer=cfg.layer,
                         prefill_chunk=cfg.prefill_chunk, places=fit.places)
    return video, video.info, {**fit.figures, **video.stats}


def run_pipeline(model: VideoLLM, video, question: str, cfg: PipelineConfig | None = None,
                 on_token=None, video_info=None, places: Places | None = None) -> PipelineResult:
    """Answer ``question`` about ``video``: a path (streamed a chunk at a time unless ``cfg.stream`` is
    off), a video already encoded (streaming.EncodedVideo, from stream_checked: a second question
    encodes nothing again), or frames [T, H, W, 3] decoded elsewhere, with their ``video_info`` when
    known (Qwen models use the frame times) and the places the check before decoding gave them
    (load_checked's; an EncodedVideo keeps its own)."""
    cfg = cfg or PipelineConfig()
    check_places(cfg)  # before any work (a bad kv was found only after the whole prefill)
    times: dict = {}  # and, for a path, what the check before decoding planned, and each stage's peak memory
    info = video_info
    device = model.adapter.device
    if isinstance(video, (torch.Tensor, EncodedVideo)):
        frames = video
        info = video.info if isinstance(video, EncodedVideo) and info is None else info
    elif cfg.stream:
        with stage_peak(times, "encode", device):
            frames, info, planned = stream_checked(model, video, [question], cfg)
        times.update(planned)
    else:
        with stage_peak(times, "decode", device), timed(times, "time_video_decode"):
            frames, info, fit = load_checked(model, video, [question], cfg)
        times.update(fit.figures)
        places = fit.places
    try:
        with stage_peak(times, "prefill", device):
            state = prefill(model, frames, question, cfg, info, places)
        del frames  # decoded or encoded here: the state (and the prefix store) keep what the answer needs
        with stage_peak(times, "answer", device):
            answer = generate_answer(state, cfg.generation, on_token=on_token, kv=cfg.kv)
    finally:
        frames = None  # a failed run's too
        # the encoded rows died with frames (unless a kept prefix holds them): their pinned blocks go back
        release_pinned()
    stats = {**answer.stats, **times}
    return PipelineResult(answer=answer, state=state, video=info, stats=stats)
