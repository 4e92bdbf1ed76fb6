"""Step 2: text->visual attention at layer K-1, from a partial prefill.

The score comes from the attention function itself, registered through
transformers' ``AttentionInterface``: that function receives the queries and
keys already rotated (RoPE or M-RoPE) and joined with the cache, scores the query
rows of one layer when a per-call ``AttentionProbe`` asks for it, and then runs
the stock kernel (sdpa by default) unchanged. Memory is O(heads * |Q| * L); no
full attention matrix is ever formed.
"""

from __future__ import annotations

import torch

from .debias import text_relevance
from .errors import AdaTPEnvironmentError, AdaTPInputError
from .flops import flops_summary
from .memory import run_guarded
from .models.base import AttentionProbe, KVCache
from .models.loader import VideoLLM
from .sdpa import plan_free_attention
from .state import AdaTPState
from .timing import timed

QUERY_MODES = ("text", "last")
_PREFIX = "adatp_"


def wrapped_attention_name(base: str) -> str:
    """Name under which AdaTP's wrapper of ``base`` is registered."""
    return _PREFIX + base


def query_attention_scores(query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor,
                           columns: torch.Tensor, scaling: float) -> torch.Tensor:
    """Mean causal softmax attention of some query rows on some key columns.

    query: [1, H, S, d] rotated queries of the S tokens in this forward call.
    key: [1, Hkv, Lk, d] rotated keys, cache included (Lk >= S; the S tokens
        are the last S keys). H must be a multiple of Hkv (GQA).
    rows: [Q] long, indices into the S query tokens.
    columns: [N] long, key positions to report.
    Returns [N] float32: the probability on each column, averaged over heads and rows.
    """
    h, hkv = query.shape[1], key.shape[1]
    s, lk, d = query.shape[2], key.shape[2], query.shape[3]
    rows = rows.to(query.device)
    q = query[0, :, rows].float()  # [H, Q, d]
    k = key[0].float()  # [Hkv, Lk, d]
    n_q = q.shape[1]
    q = q.reshape(hkv, (h // hkv) * n_q, d)  # heads of one KV group share its keys
    logits = torch.matmul(q, k.transpose(1, 2)).mul_(scaling).view(h, n_q, lk)
    key_pos = torch.arange(lk, device=query.device)
    row_pos = rows + (lk - s)
    logits.masked_fill_(key_pos[None, None, :] > row_pos[None, :, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs[:, :, columns.to(query.device)].mean(dim=(0, 1))


def _wrapper(base_fn):
    def attention(module, query, key, value, attention_mask, adatp_probe=None, **kwargs):
        if adatp_probe is not None:
            adatp_probe.scores = query_attention_scores(
                query, key, adatp_probe.query_positions, adatp_probe.key_positions,
                kwargs.get("scaling") or module.scaling)
        # RoPE is already applied; position ids would only make flash kernels
        # mistake pruned (gapped) positions for packed sequences.
        kwargs.pop("position_ids", None)
        return base_fn(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"adatp_{base_fn.__name__}"
    return attention


def register_attention(base: str = "sdpa") -> str:
    """Register AdaTP's wrapper of ``base`` (idempotent). Returns its name.

    Called by the model loader, never at import.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if base == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise AdaTPEnvironmentError("attention flash_attention_2 needs the flash-attn package; use sdpa")
    if base not in ALL_ATTENTION_FUNCTIONS:
        raise AdaTPInputError(f"unknown attention {base!r}")
    name = wrapped_attention_name(base)
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _wrapper(ALL_ATTENTION_FUNCTIONS[base]))  # looked up once, not per call
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


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


def _prefill(adapter, frames, prompt, layer: int, query: str, times: dict):
    """Vision encoder, prompt assembly, layers 0..K-1 and the scores (see extract_attention)."""
    dev = adapter.device
    with torch.inference_mode():
        with timed(times, "time_preprocess", dev):
            pixels = adapter.preprocess(frames)
        with timed(times, "time_vision", dev):
            encoded = adapter.encode(pixels)
        del pixels
        with timed(times, "time_attention", dev):
            embeds = adapter.assemble(prompt, encoded)
            position_ids = adapter.position_ids(prompt)
            q_start, q_end = prompt.question
            relevance = text_relevance(encoded.visual, embeds[0, q_start:q_end])
            if layer == 0:
                return encoded, embeds, (), relevance, relevance, position_ids
            if query == "text":
                rows = torch.arange(prompt.after_video, prompt.length)
            else:
                rows = torch.tensor([prompt.length - 1])
            probe = AttentionProbe(layer - 1, rows, prompt.visual_positions)
            cache = KVCache(adapter.num_layers)
            hidden = adapter.run_layers(embeds, position_ids, cache, 0, layer, probe=probe)
            if probe.scores is None:
                raise AdaTPEnvironmentError(
                    "the attention probe was not called; load the model with AdaTP's loader")
            return encoded, hidden, cache.export(layer), probe.scores, relevance, position_ids


def extract_attention(model: VideoLLM, frames: torch.Tensor, question: str, layer: int = 2,
                      query: str = "text") -> AdaTPState:
    """Encode the video, run LLM layers 0..K-1 once, and score the visual tokens.

    frames: [T, H, W, 3] uint8 or float 0..1 (ComfyUI IMAGE).
    layer: K. K = 0 prunes before the LLM; its scores are the text relevance.
    query: "text" (every text token after the video) or "last" (FastV's choice).
    Returns a state holding the layer-K input hidden states, the KV cache of
    layers < K, the original position ids and the scores.
    """
    adapter = model.adapter
    question = check_question(question)
    frames = _check_frames(frames)
    if query not in QUERY_MODES:
        raise AdaTPInputError(f"query must be one of {QUERY_MODES}, got {query!r}")
    layer = int(layer)
    adapter.check_layer(layer)
    n_frames = int(frames.shape[0])
    prompt = adapter.build_prompt(question, adapter.visual_tokens_for(n_frames))
    if prompt.question[1] == prompt.question[0]:
        raise AdaTPInputError("the question has no tokens; type a question about the video")
    adapter.check_context(prompt)

    times: dict[str, float] = {}
    with plan_free_attention(adapter.device):  # no per-shape cuDNN plans (see sdpa.py)
        encoded, hidden, past_kv, scores, relevance, position_ids = run_guarded(
            lambda: _prefill(adapter, frames, prompt, layer, query, times), "vision encoding and prefill")
    t, h, w = encoded.grid
    stats = {
        "frames": t, "tokens_total": t * h * w, "tokens_kept": t * h * w,
        "layer": layer, "query": query, "prompt_tokens": prompt.length,
        **flops_summary(model, prompt, keep_count=t * h * w, layer=layer),
        **times,
    }
    return AdaTPState(
        model=model, question=question, prompt=prompt, layer=layer, query_mode=query,
        grid=encoded.grid, hidden=hidden, past_kv=past_kv, position_ids=position_ids,
        scores=scores.float(), relevance=relevance,
        frame_relevance=relevance.view(t, -1).mean(dim=1),
        frame_features=encoded.frame_features, segments=((0, t - 1),), stats=stats,
    )
