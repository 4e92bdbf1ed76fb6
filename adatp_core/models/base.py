"""What every model family provides to the AdaTP stages, and the shared LLM runner.

The stages never touch a model's modules: they call an adapter. An adapter turns
frames into visual tokens, builds the prompt and its token layout, gives position
ids, and runs decoder layers. Families whose LLM is a stock transformers decoder
(Qwen2, Llama, Qwen2.5-VL's text model) share ``run_layers`` and ``logits`` below;
a family only describes its vision side and its prompt.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import AdaTPInputError
from ..memory import buffer_like
from ..hf.attention_hook import TailCausal, aligns_causal_to_the_end
from ..hf.layers import cache_argument, module_device, run_decoder_layers
from .chat import end_of_turn_id


# Frame rate assumed when no frame times are given: what transformers' video
# processors assume for frames without metadata (VideoMetadata.sampled_fps).
DEFAULT_FPS = 24.0


@dataclass(frozen=True)
class VideoPlan:
    """How one video becomes visual tokens, decided from its shape before any GPU work.

    num_frames: frames given.
    size: (height, width) each frame is resized to.
    grid: (T', H', W') prunable token grid; T' temporal steps of ``frames_per_step`` frames
        (Qwen: 2 frames per temporal patch; an odd count is padded with the last frame).
    frame_times: seconds of each given frame; assumed at DEFAULT_FPS when times_assumed.
    """

    num_frames: int
    size: tuple[int, int]
    grid: tuple[int, int, int]
    frame_times: tuple[float, ...]
    times_assumed: bool = False
    frames_per_step: int = 1

    @property
    def tokens_per_step(self) -> int:
        return self.grid[1] * self.grid[2]

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.tokens_per_step

    def step_times(self) -> tuple[float, ...]:
        """Seconds of each temporal step: the mean of its first and last frame
        (the last frame repeated as padding), as Qwen3-VL's processor computes them."""
        n = self.frames_per_step
        times = list(self.frame_times) + [self.frame_times[-1]] * (-len(self.frame_times) % n)
        return tuple((times[i] + times[i + n - 1]) / 2 for i in range(0, len(times), n))

    def part(self, start: int, stop: int) -> "VideoPlan":
        """The plan of frames [start, stop) of this video, at the same size: a chunk that the vision
        side encodes on its own. ``start`` must begin a temporal step (a multiple of frames_per_step);
        an odd tail is padded as the whole video's is."""
        if start % self.frames_per_step or not 0 <= start < stop <= self.num_frames:
            raise ValueError(f"frames [{start}, {stop}) are not a chunk of whole temporal steps of this "
                             f"{self.num_frames}-frame plan ({self.frames_per_step} frames a step)")
        n = stop - start
        return VideoPlan(num_frames=n, size=self.size, grid=(-(-n // self.frames_per_step), *self.grid[1:]),
                         frame_times=self.frame_times[start:stop], times_assumed=self.times_assumed,
                         frames_per_step=self.frames_per_step)

    def seconds_per_step(self) -> float:
        """Mean spacing of the given frames, times frames_per_step (Qwen2.5-VL's
        second_per_grid_ts); a single frame counts as DEFAULT_FPS."""
        t = self.frame_times
        spacing = (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 and t[-1] > t[0] else 1 / DEFAULT_FPS
        return self.frames_per_step * spacing


def frame_times(num_frames: int, times=None) -> tuple[tuple[float, ...], bool]:
    """(times, assumed): the given per-frame times in seconds, or DEFAULT_FPS ones."""
    if times is not None and len(times) == num_frames:
        return tuple(float(x) for x in times), False
    return tuple(i / DEFAULT_FPS for i in range(num_frames)), True


@dataclass(frozen=True)
class Injection:
    """Features added to some rows' hidden states after the first decoder layers
    (Qwen3-VL's DeepStack): after layer i < len(features), hidden[:, rows] += features[i].

    rows: [n] long, ascending, rows of the hidden states passed to ``run_layers``.
    features: per layer, [n, D], or None for a layer the call does not run (layers < K after them);
        on the rows' device, or waiting on the host (Places.encoded).
    """

    rows: torch.Tensor
    features: tuple[torch.Tensor, ...]

    def window(self, start: int, stop: int) -> "Injection | None":
        """The injection for a call over rows [start, stop) of these rows: the rows inside, counted
        from ``start`` (None when none is inside); their features are a slice of these (no copy)."""
        lo, hi = span_of(self.rows, start, stop)
        if lo == hi:
            return None
        if (lo, hi) == (0, len(self.rows)):  # every row (one call over all of them)
            return self if start == 0 else Injection(self.rows - start, self.features)
        return Injection(self.rows[lo:hi] - start, tuple(None if f is None else f[lo:hi] for f in self.features))


def span_of(positions: torch.Tensor, start: int, stop: int) -> tuple[int, int]:
    """(lo, hi): positions[lo:hi] are the ascending ``positions`` within [start, stop). A call's span of
    rows indexed by them is then a slice, not a gather: a view, so rows waiting in pinned host memory
    (Places.encoded) go to the device from there at full speed, and nothing is copied on the host."""
    bounds = torch.searchsorted(positions, torch.tensor([start, stop], dtype=positions.dtype, device=positions.device))
    lo, hi = bounds.tolist()
    return lo, hi


@dataclass(frozen=True)
class Encoded:
    """The vision side of one video, in the LLM's input space.

    visual: [N, D] projected visual tokens, frame-major then row-major (N = T*H*W); on the device,
        or waiting on the host (Places.encoded), read a prefill call's span at a time (``assemble``).
    extras: [E, D] always-kept model extras that follow the video (LLaVA-OV: newline).
    frame_features: [T, d_v] float32, L2-normalised per-frame global features
        (mean of the vision encoder's patches before projector and pooling).
    grid: (T, H, W) token grid of ``visual`` (T temporal steps).
    injections: per decoder layer, [N, D] features added to the visual tokens'
        hidden states after that layer (Qwen3-VL's DeepStack); empty for other families. Where
        ``visual`` is (``Injection.window`` reads a call's rows).
    """

    visual: torch.Tensor
    extras: torch.Tensor
    frame_features: torch.Tensor
    grid: tuple[int, int, int]
    injections: tuple[torch.Tensor, ...] = ()


def join_encoded(parts, rows: int | None = None, place: torch.device | None = None) -> Encoded:
    """One Encoded from those of consecutive chunks of a video (``VideoPlan.part``), as one pass
    over all of its frames gives: rows, frame features and each layer's injections joined in
    order, the temporal grids added, the extras (the same for every chunk) taken once.

    rows: the video's token count (``VideoPlan.num_tokens``), when known: ``parts`` may then be
    a generator, and each part's rows are copied into buffers of that many rows as it comes and
    the part let go, so the chunks' rows and the joined rows never all exist at once (at a
    thousand frames those rows, with DeepStack's, are the encode's largest tensors).
    place: where the visual and DeepStack rows are written (None: where the parts are, the device);
    the host when the device is short (Places.encoded), pinned for a GPU's rows so that a prefill
    call's span of them goes back at full speed. Extras and frame features stay with the parts."""
    parts = iter(parts)
    first = next(parts)
    second = next(parts, None)
    if second is None:
        return _placed(first, place)
    if rows is None:
        parts = [first, second, *parts]
        return _placed(Encoded(visual=torch.cat([p.visual for p in parts]), extras=first.extras,
                               frame_features=torch.cat([p.frame_features for p in parts]),
                               grid=(sum(p.grid[0] for p in parts), *first.grid[1:]),
                               injections=tuple(torch.cat(layer) for layer in zip(*(p.injections for p in parts)))),
                       place)
    extras, grid = first.extras, first.grid
    visual = _rows_buffer(first.visual, rows, place)
    injections = tuple(_rows_buffer(f, rows, place) for f in first.injections)
    features, steps, at = [], 0, 0
    for part in (first, second):
        at, steps = _write_part(part, visual, injections, features, at, steps)
    del first, second, part
    for part in parts:
        at, steps = _write_part(part, visual, injections, features, at, steps)
        del part
    if at < rows:  # fewer frames came than planned: what they gave (the caller says so)
        visual, injections = visual[:at], tuple(f[:at] for f in injections)
    return Encoded(visual=visual, extras=extras, frame_features=torch.cat(features), grid=(steps, *grid[1:]),
                   injections=injections)


def _rows_buffer(like: torch.Tensor, rows: int, place: torch.device | None) -> torch.Tensor:
    """An empty [rows, D] buffer of ``like``'s dtype on ``place`` (None: like's device), pinned on the
    host when ``like`` is on a GPU (memory.buffer_like, as attention._Rows)."""
    return buffer_like((rows, like.shape[-1]), like, like.device if place is None else torch.device(place))


def _placed(encoded: Encoded, place: torch.device | None) -> Encoded:
    """``encoded`` with its visual and DeepStack rows on ``place`` (None, or there already: itself)."""
    if place is None or encoded.visual.device == torch.device(place):
        return encoded

    def moved(t):
        return _rows_buffer(t, t.shape[0], place).copy_(t)

    return replace(encoded, visual=moved(encoded.visual), injections=tuple(moved(f) for f in encoded.injections))


def _write_part(part: Encoded, visual, injections, features: list, at: int, steps: int) -> tuple[int, int]:
    """join_encoded's copy of one part's rows to [at, at + n) of the buffers."""
    n = part.visual.shape[0]
    if at + n > visual.shape[0]:
        raise ValueError(f"the chunks gave more visual rows than the {visual.shape[0]} planned")
    visual[at:at + n] = part.visual
    for buffer, rows in zip(injections, part.injections, strict=True):
        buffer[at:at + n] = rows
    features.append(part.frame_features)
    return at + n, steps + part.grid[0]


@dataclass(frozen=True)
class Prompt:
    """Token ids of one query and where each part sits.

    input_ids: [L] long, with ``video_token_id`` at every visual and extra position.
    visual_positions: [N] long, sequence positions of the visual tokens (frame-major: ascending).
    extra_positions: [E] long, ascending sequence positions of always-kept model extras.
    question: (start, end) of the question's own tokens (Q_text).
    after_video: first position after the video and its extras; Q is [after_video, L).
    plan: the video plan the prompt was built for (None for a bare token count).
    """

    input_ids: torch.Tensor
    visual_positions: torch.Tensor
    extra_positions: torch.Tensor
    question: tuple[int, int]
    after_video: int
    plan: VideoPlan | None = None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class AttentionProbe:
    """Per-call request for text->visual attention at one layer (see attention.py).

    It travels as a keyword argument through one decoder layer's call to the
    attention function, which fills ``scores``. Nothing is stored on the model.
    """

    layer: int
    query_positions: torch.Tensor  # [Q] long
    key_positions: torch.Tensor  # [N] long
    scores: torch.Tensor | None = field(default=None)


# Keys of ``VideoLLMAdapter.fallbacks`` (also the stats keys that report them).
FALLBACK_STATIC_DECODING = "fallback_static_decoding"
FALLBACK_BATCHED_VISION = "fallback_batched_vision"


GENERATION_CONFIG_FILE = "generation_config.json"
# The pixel budget a dynamic-resolution family takes from the model folder's video processor
# (``plan_video(max_pixels=MODEL_BUDGET)``), instead of the pack's default.
MODEL_BUDGET = "model"


class VideoLLMAdapter:
    """Base of the per-family adapters (llava_onevision.py, qwen2_5_vl.py, qwen3_vl.py).

    Subclasses set ``model_types`` and ``model_class`` and implement ``plan_video``,
    ``preprocess``, ``encode``, ``build_prompt`` and ``vision_flops`` (and
    ``position_ids`` for M-RoPE); ``text_model`` must return a transformers decoder
    with ``embed_tokens``, ``layers``, ``norm`` and ``rotary_emb``.
    """

    model_types: tuple[str, ...] = ()
    # Module-name prefixes (from the top of the transformers model) that 4/8-bit loading leaves in
    # the compute dtype: the whole vision side and lm_head. Only the LLM's decoder layers are quantized.
    unquantized_modules: tuple[str, ...] = ("lm_head",)
    # Modules and parameters that the adapter calls piece by piece before the decoder layers (the
    # vision side, the token embeddings): a model split over GPUs keeps them together on the first.
    input_modules: tuple[str, ...] = ()
    # Whether the chat template opens a thinking block that enable_thinking=False does not close
    # (a "-Thinking" model): its answers then start with the model's thinking.
    always_thinks: bool = False
    # Whether the LLM has linear-attention layers (Gated DeltaNet), whose kernels loader.py checks.
    linear_attention: bool = False
    # Why a new question cannot reuse a video's prefix (chat.video_prefix_refusal); None: it can.
    prefix_refusal: str | None = "this model family does not check its chat template for prefix reuse"
    # Whether the position ids are M-RoPE's ([3, 1, L], growing with the video's time, not its tokens):
    # the context is then a limit on the largest position id (check_context).
    mrope: bool = False

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        # The model_type, which errors raised inside transformers name (hf/versions.py).
        self.family: str = model.config.model_type
        self._cache_arg = cache_argument(self.text_model.layers[0])
        self._linear_layers = frozenset(i for i, kind in enumerate(self.layer_kinds) if kind == "linear_attention")
        # Fast paths that failed on this model and stay off until it is reloaded (a new adapter):
        # name (FALLBACK_STATIC_DECODING, FALLBACK_BATCHED_VISION) -> what failed, for the stats.
        self.fallbacks: dict[str, str] = {}

    # -- the family-specific part -------------------------------------------------
    @property
    def text_model(self):
        raise NotImplementedError

    def plan_video(self, num_frames: int, height: int, width: int, times=None,
                   max_pixels: int | None = None) -> VideoPlan:
        """The token grid of a video of ``num_frames`` frames of height x width.

        times: seconds of each frame (None: assumed at DEFAULT_FPS).
        max_pixels: pixel budget per frame for families with dynamic resolution
            (None: the pack's default; MODEL_BUDGET: the model's video processor's own budget);
            fixed-resolution families ignore it.
        """
        raise NotImplementedError

    def budget_text(self, plan: VideoPlan, max_pixels) -> str:
        """Which pixel budget ``plan`` ran with, for the stats (fixed-resolution families: their size)."""
        return f"fixed {plan.size[1]}x{plan.size[0]} per frame (this family has no pixel budget)"

    def processor_sampling(self) -> tuple[float, int, int]:
        """(fps, min_frames, max_frames) with which the model's video processor samples a video.
        Raises AdaTPInputError for a family whose processor samples nothing itself."""
        raise AdaTPInputError(
            f"this model's video processor ({self.family}) does not sample frames itself: transformers gives it "
            "every frame it is handed; choose uniform or fps sampling (or the Qwen-VL preset)")

    def preprocess(self, frames: torch.Tensor, plan: VideoPlan | None = None) -> torch.Tensor:
        """frames: [T, H, W, 3] float 0..1 or uint8 -> model pixel input."""
        raise NotImplementedError

    def encode(self, pixels: torch.Tensor, plan: VideoPlan | None = None) -> Encoded:
        raise NotImplementedError

    # Frames the vision side takes at once (encode_chunks): preprocessing and the tower run over
    # this many frames at a time, so their memory does not grow with the video.
    FRAMES_PER_CHUNK = 16

    def chunk_frames(self, plan: VideoPlan, chunk: int | None = None) -> int:
        """Frames per vision chunk: ``chunk`` (default FRAMES_PER_CHUNK) rounded up to whole temporal
        steps (Qwen: 2 frames a temporal patch), so that every chunk but the last starts a step."""
        n = max(int(chunk or self.FRAMES_PER_CHUNK), 1)
        return -(-n // plan.frames_per_step) * plan.frames_per_step

    def encode_chunks(self, chunks, plan: VideoPlan, times: dict | None = None,
                      place: torch.device | None = None) -> Encoded:
        """Preprocess and encode a video a chunk of frames at a time: the same Encoded as
        ``encode(preprocess(all frames))`` within float tolerance, since every family's tower
        attends within a frame (SigLIP) or a temporal patch (Qwen), never across.

        chunks: iterable of frames [c, H, W, 3] (uint8 or float 0..1; numpy or torch) in order, each c a
            multiple of ``plan.frames_per_step`` except the last (``chunk_frames``). It may be lazy (a
            video.FrameStream): one chunk's frames and pixels exist at a time; only the encoded rows
            of all frames are kept.
        times: a stats dict that gets time_preprocess and time_vision added.
        place: where the visual and DeepStack rows wait, written chunk by chunk as they are encoded
            (None: the device; the host when it is short: Places.encoded, join_encoded).
        """
        from ..timing import timed

        times = {} if times is None else times
        start = 0

        def parts():
            nonlocal start
            for frames in chunks:
                frames = torch.as_tensor(frames)
                part = plan.part(start, start + int(frames.shape[0]))
                with timed(times, "time_preprocess", self.device):
                    pixels = self.preprocess(frames, part)
                del frames
                with timed(times, "time_vision", self.device):
                    encoded = self.encode(pixels, part)
                del pixels
                start += part.num_frames
                yield encoded
                del encoded

        try:
            joined = join_encoded(parts(), plan.num_tokens, place)
        except StopIteration:  # no chunk came
            joined = None
        if start != plan.num_frames:
            raise AdaTPInputError(f"{start} frames were encoded for a plan of {plan.num_frames}; "
                                  "the video gave fewer frames than it was planned with")
        return joined

    def encode_frames(self, frames: torch.Tensor, plan: VideoPlan, times: dict | None = None,
                      chunk: int | None = None, place: torch.device | None = None) -> Encoded:
        """frames [T, H, W, 3] (an IMAGE) -> Encoded, ``chunk_frames`` frames at a time (encode_chunks)."""
        step = self.chunk_frames(plan, chunk)
        return self.encode_chunks((frames[i:i + step] for i in range(0, plan.num_frames, step)), plan, times, place)

    def build_prompt(self, question: str, video) -> Prompt:
        """video: a VideoPlan (or, for fixed-resolution families, a token count)."""
        raise NotImplementedError

    def vision_flops(self, prompt: Prompt) -> float:
        """FLOPs of the vision encoder and projector for the prompt's video (flops.py)."""
        raise NotImplementedError

    def position_ids(self, prompt: Prompt) -> torch.Tensor:
        """Position ids of the full prompt, [1, L] (or [3, 1, L] for M-RoPE)."""
        return torch.arange(prompt.length, device=self.device).unsqueeze(0)

    # -- shared by decoder-only LLMs ----------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.text_model.layers)

    @property
    def device(self) -> torch.device:
        """The input device: token embeddings, the vision side and the selection tensors live here."""
        return module_device(self.text_model.embed_tokens)

    @property
    def output_device(self) -> torch.device:
        """Where the logits come out (lm_head's device; another GPU when the model is split)."""
        return module_device(self.model.lm_head)

    @property
    def is_split(self) -> bool:
        """Whether the decoder layers (and the input and output ends) are on more than one device."""
        devices = {module_device(layer) for layer in self.text_model.layers}
        return len(devices | {self.device, self.output_device}) > 1

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.embed_tokens.weight.dtype

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model.embed_tokens(input_ids.to(self.device))

    def assemble(self, prompt: Prompt, encoded: Encoded, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """inputs_embeds [1, stop - start, D] of positions [start, stop) (default: the whole
        prompt, [1, L, D]): text embeddings with the video scattered in."""
        stop = prompt.length if stop is None else stop
        embeds = self.embed_tokens(prompt.input_ids[start:stop]).clone()
        for positions, values in ((prompt.visual_positions, encoded.visual),
                                  (prompt.extra_positions, encoded.extras)):
            if not len(positions):
                continue
            if start or stop < prompt.length:  # the span's rows: a slice (they may wait on the host)
                lo, hi = span_of(positions, start, stop)
                positions, values = positions[lo:hi] - start, values[lo:hi]
            embeds[positions] = values.to(embeds.device, embeds.dtype)
        return embeds.unsqueeze(0)

    def next_position_ids(self, position_ids: torch.Tensor, step: int) -> torch.Tensor:
        """Position ids of the step-th generated token: one past the prompt's
        largest position on every axis (1-D RoPE and M-RoPE alike)."""
        nxt = int(position_ids.max()) + 1 + step
        return torch.full((*position_ids.shape[:-1], 1), nxt, dtype=position_ids.dtype,
                          device=position_ids.device)

    # -- layer kinds (hybrid models: some layers are linear attention) -----------
    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """Each decoder layer's kind, from the text config's ``layer_types`` where it has
        one ("full_attention", "sliding_attention", "linear_attention", ...), else
        "full_attention" for every layer. Never a hard-coded pattern."""
        kinds = getattr(self.text_model.config, "layer_types", None)
        if kinds is None or len(kinds) != self.num_layers:
            return ("full_attention",) * self.num_layers
        return tuple(kinds)

    def is_linear_layer(self, i: int) -> bool:
        """Whether layer i is linear attention (a recurrent state, no softmax probabilities)."""
        return i in self._linear_layers

    def valid_layers(self) -> tuple[int, ...]:
        """The Ks that AdaTP can use: 0 (prune before the LLM, by text relevance) and every
        K in [1, num_layers) whose layer K-1 has softmax attention to score with."""
        return (0, *(k for k in range(1, self.num_layers) if not self.is_linear_layer(k - 1)))

    def default_layer(self, asked: int = 2) -> int:
        """The K that the spec's default K = 2 (or ``asked``) becomes on this model."""
        return self.resolve_layer(asked)[0]

    def resolve_layer(self, layer: int) -> tuple[int, str | None]:
        """(the K that runs, why it is not the K asked for; None when it is).

        A K whose layer K-1 is linear attention moves up to the next valid K (the spec's
        hybrid rule), so a shared workflow with K = 2 keeps working on Qwen3.5. Raises
        when K is out of range or no valid K is at or above it."""
        self.check_layer(layer)
        valid = self.valid_layers()
        if layer in valid:
            return layer, None
        above = [k for k in valid if k > layer]
        if not above:
            raise AdaTPInputError(
                f"layer K={layer} cannot be used on this model: layer {layer - 1} is linear attention "
                f"(no attention scores), and no full-attention layer follows before the last layer. "
                f"Choose K from {', '.join(map(str, valid))}.")
        return above[0], (f"K={layer} moved to K={above[0]}: layer {layer - 1} is linear attention, which has "
                          f"no attention scores; the scores come from layer {above[0] - 1}, the next "
                          f"full-attention layer")

    # The chunk of the chunked gated delta rule (transformers' torch_chunk_gated_delta_rule and
    # flash-linear-attention both use 64): linear-attention layers fold tokens in per chunk.
    LINEAR_CHUNK = 64

    def prefix_length(self, prompt: Prompt) -> int:
        """How many leading positions a reused video prefix holds: every position before the
        question's text (``after_video``); with linear-attention layers, that rounded down to
        a whole number of chunks, so the prefix and the rest fold into the recurrent state in
        the very chunks one pass over the prompt uses, and reuse gives the same numbers."""
        p = prompt.after_video
        return p - p % self.LINEAR_CHUNK if self._linear_layers else p

    def chunk_spans(self, start: int, stop: int, chunk: int | None) -> list[tuple[int, int]]:
        """[start, stop) cut into calls of at most ``chunk`` tokens (one call when chunk is 0 or
        None, or covers it all). With linear-attention layers the chunk is rounded down to a whole
        number of the delta rule's chunks (at least one), and ``start`` must sit on that grid: the
        calls then fold tokens into the recurrent state in the very chunks one call uses."""
        if not chunk or stop - start <= chunk:
            return [(start, stop)]
        if self._linear_layers:
            chunk = max(self.LINEAR_CHUNK, chunk - chunk % self.LINEAR_CHUNK)
            if start % self.LINEAR_CHUNK:
                raise ValueError(f"a chunked call over linear-attention layers must start on their "
                                 f"{self.LINEAR_CHUNK}-token grid, not at {start}")
        return [(a, min(a + chunk, stop)) for a in range(start, stop, chunk)]

    def tail_masks(self, past: int, n: int, start: int, stop: int) -> list | None:
        """Masks for a call of n tokens over layers [start, stop) whose cache holds ``past``
        positions at those layers: one ``TailCausal`` (no [n, past + n] tensor; AdaTP's sdpa wrapper
        runs the queries in blocks) shared by the attention layers, None for linear-attention layers.
        None when none is needed: an empty cache (sdpa's is_causal is right then) or an attention
        that aligns the causal mask to the end itself (flash)."""
        if not past or aligns_causal_to_the_end(self.text_model.config):
            return None
        tail = TailCausal(past, n)
        return [None if i < start or i in self._linear_layers else tail for i in range(stop)]

    def run_chunks(self, spans, rows_of, position_ids, cache, start: int, stop: int,
                   probe: AttentionProbe | None = None, inject: Injection | None = None,
                   write=None) -> torch.Tensor:
        """Run decoder layers [start, stop) over the rows of ``spans`` ((a, b), ascending and
        contiguous), one call per span, each attending to everything the cache holds and causally
        within itself: what one ``run_layers`` call over all of them computes, within float
        tolerance, with one span's activations at a time.

        Positions count from where the cache is empty at these layers: before span (a, b) it holds
        a positions. rows_of(a, b) -> hidden [1, b - a, D]; position_ids [1, S] (or [3, 1, S]) and
        ``inject`` rows are in the same count. ``probe``'s query rows are rows of the last span.
        write(a, b, hidden) takes each span's output. Returns the last span's output.
        """
        out = None
        for i, (a, b) in enumerate(spans):
            last = i == len(spans) - 1
            out = self.run_layers(rows_of(a, b), position_ids[..., a:b], cache, start, stop,
                                  probe=probe if last else None, masks=self.tail_masks(a, b - a, start, stop),
                                  inject=inject.window(a, b) if inject is not None else None)
            if write is not None:
                write(a, b, out)
        return out

    def run_layers(self, hidden, position_ids, cache, start: int, stop: int,
                   probe: AttentionProbe | None = None, masks=None,
                   inject: Injection | None = None) -> torch.Tensor:
        """Run decoder layers [start, stop) on hidden [1, S, D] at position_ids.

        The tokens in ``hidden`` are in sequence order and attend causally to each
        other and to everything already in ``cache`` for that layer (which is
        how a prompt prefill with an empty cache and a one-token decode step both
        behave). No attention mask is built: batch 1 needs none. ``masks``, one
        per layer, is for caches that return fixed-size buffers (static decoding).
        ``inject`` adds per-layer features to some rows after the first layers
        (Qwen3-VL's DeepStack), the way the stock text model does.
        """
        return run_decoder_layers(self.text_model, hidden, position_ids, cache, start, stop, self._cache_arg,
                                  linear_layers=self._linear_layers, probe=probe, masks=masks, inject=inject,
                                  family=self.family)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [1, S, D] after the last layer -> float32 logits [S, V]."""
        return self._head(hidden)[0]

    def last_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, D] after the last layer -> float32 logits [B, V] of each row's last position."""
        return self._head(hidden[:, -1:])[:, 0]

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.text_model.norm(hidden.to(module_device(self.text_model.norm)))
        return self.model.lm_head(hidden.to(self.output_device)).float()

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Where an answer stops: the model's generation config's eos ids, else the tokenizer's.

        A folder without generation_config.json has no stop of its own for the chat (transformers
        then takes config.json's or the tokenizer's eos, which may be ``<|endoftext|>``), so the
        chat template's end of the assistant's turn is added (``chat.end_of_turn_id``)."""
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        if ids is None:
            ids = self.tokenizer.eos_token_id
        ids = () if ids is None else tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)
        if not self.has_generation_config:
            turn = self.end_of_turn
            if turn is not None and turn not in ids:
                ids += (turn,)
        return ids

    @functools.cached_property
    def has_generation_config(self) -> bool:
        """Whether the model folder has a generation_config.json (True when there is no folder to ask).
        Asked of the disk once per loaded model, not at every answer; the ids themselves are read
        from ``generation_config`` each time, so a change made to it in memory takes effect."""
        folder = getattr(self, "folder", None)
        return folder is None or (Path(folder) / GENERATION_CONFIG_FILE).is_file()

    @functools.cached_property
    def end_of_turn(self) -> int | None:
        """The token the chat template ends the assistant's turn with (None: none found)."""
        template = getattr(self, "chat_template", None)
        return end_of_turn_id(self.tokenizer, template) if template else None

    def position_extent(self, prompt: Prompt) -> int:
        """How many rotary positions the prompt spans: its length for 1-D positions; for M-RoPE
        (``mrope``) its largest position id + 1, which grows with the video's time, not its tokens."""
        if not self.mrope:
            return prompt.length
        return int(self.position_ids(prompt).max()) + 1

    def check_context(self, prompt: Prompt) -> None:
        """Refuse a prompt beyond the LLM's context, before any GPU work (or any frame is decoded).

        1-D positions (LLaVA-OV): the token count against ``max_position_embeddings``. M-RoPE
        (Qwen2.5-VL, Qwen3-VL, Qwen3.5, their MoE models): the largest position id, since the limit
        is on positions and those of a video grow with its frames' time, not with its tokens."""
        limit = getattr(self.text_model.config, "max_position_embeddings", None)
        if limit is None or prompt.length <= limit and not self.mrope:
            return
        extent = self.position_extent(prompt)
        if extent <= limit:
            return
        fit, plan = "", prompt.plan
        if self.mrope:
            if plan is not None and plan.num_frames:
                n = int(plan.num_frames * limit // extent)
                n -= n % plan.frames_per_step
                fit = f" (about {n} frames fit)" if n > 0 else " (the text alone leaves no room for a frame)"
            raise AdaTPInputError(
                f"the prompt's positions reach {extent} ({prompt.length} tokens; this model's M-RoPE positions "
                f"grow with the video's time) but this model's context is {limit} positions; use fewer frames, "
                f"a shorter span of the video or a shorter question{fit}.")
        if plan is not None and plan.num_frames:
            per_frame = plan.num_tokens / plan.num_frames
            n = int((limit - (prompt.length - plan.num_tokens)) // per_frame)
            n -= n % plan.frames_per_step
            fit = (f" (about {n} frames fit, at {per_frame:g} tokens a frame)" if n > 0 else
                   f" (the text alone leaves no room for a frame of {per_frame:g} tokens)")
        raise AdaTPInputError(
            f"the prompt needs {prompt.length} tokens but this model's context is {limit}; "
            f"use fewer frames or a shorter question{fit}.")

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            if self._linear_layers:  # hybrid: only some Ks score at a full-attention layer
                choose = (f"choose K from {', '.join(map(str, self.valid_layers()))} (0 prunes before the LLM; "
                          "the others score at a full-attention layer K-1)")
            else:
                choose = (f"choose K between 0 (prune before the LLM) and {self.num_layers - 1} "
                          "(2 is the default)")
            raise AdaTPInputError(f"layer K={layer} is outside this model's {self.num_layers} decoder layers; "
                                  f"{choose}.")
