"""How each next token is chosen: the one home of the sampling code.

The semantics are transformers' ``generate()`` (5.24, generation/utils.py and
logits_process.py), so that a keep-all answer is token for token the stock one:

- settings: what the caller set, else the model's ``generation_config`` (its
  generation_config.json), else transformers' global defaults (greedy, temperature 1,
  top_k 50, top_p 1, repetition_penalty 1). ``None`` in a ``SamplingConfig`` means
  "not set": the model decides.
- order: the repetition penalty first (also when greedy), then, when sampling,
  temperature, top-k, top-p, and a draw from the softmax.
- repetition penalty: every token id already in the sequence, the prompt's included,
  has its logit divided by the penalty (multiplied when negative), once per id.
  The prompt is what stock ``generate(input_ids=...)`` sees, the usual call for all
  three families (the processor's input_ids, each visual token as its placeholder id);
  pruned tokens count too, since the prompt's ids are those of the whole prompt.
  (Stock ``generate(inputs_embeds=...)`` without input_ids would penalise only the new
  tokens; nothing here calls it that way.)

Floors on the two settings that divide the logits (``MIN_TEMPERATURE``,
``MIN_REPETITION_PENALTY``, both 0.01): a caller's smaller value is refused. At
0.01 a seen token's logit is already 100 times its own (the answer repeats the
prompt) and a 0.05 logit lead already wins 99% of draws (greedy in effect); far
below, float32 logits overflow: 1e-40 makes them inf, so greedy decoding picks a
seen token every step ("???????") and sampling draws from NaN probabilities.
transformers only asks for > 0; vLLM raises a temperature under 0.01 to 0.01 and
decodes greedily under 1e-5, which is what a model's own generation config gets
here (models built on Qwen2.5-VL ship do_sample with temperature 1e-6, meaning
"deterministic").

Everything runs on the logits' device, and choosing adds no host sync, whatever the
settings and however many rows: the ids seen so far live in a device-side mask per
answer (``TokenChooser``), updated from the chosen tokens' device tensor; the draw is
the exponential race that ``torch.multinomial`` runs for one sample, without its host
checks of the probabilities (``draw``); ``choose_rows`` chooses for B answers at once.
The prompt's ids are copied to the device once per answer. The caller reads the
chosen tokens to the host once per step (its stop checks need them): one answer's
``int(token)``, the batch's one ``tolist()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .errors import AdaTPInputError

MAX_NEW_TOKENS_LIMIT = 8192
# "auto": static on CUDA (graphs replayed across answers) while the cache is short enough for static
# steps to pay off (static_decode.static_pays_off), default elsewhere (on CPU
# static steps are not faster: there is no launch cost to save).
DECODE_MODES = ("default", "static", "auto")
# transformers' global defaults (GenerationConfig._get_default_generation_params), used
# where neither the caller nor the model's generation config sets a value.
HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}
MODEL_SETTINGS = tuple(HF_DEFAULTS)  # the settings a model's generation config may give
# The floors of the settings that divide the logits (module docstring). 0.01 is Generate Answer's
# temperature minimum and the repetition_penalty widget's step, so no saved workflow holds less.
MIN_TEMPERATURE = 1e-2
MIN_REPETITION_PENALTY = 1e-2
GREEDY_TEMPERATURE = 1e-5  # a model's generation config temperature below this means greedy decoding


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. A setting left at None is the model's
    (``resolve``): its generation_config.json, else transformers' default."""

    max_new_tokens: int = 128
    do_sample: bool | None = None  # None: the model's (greedy unless its generation config samples)
    temperature: float | None = None
    top_p: float | None = None
    seed: int = 0
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks)
    decode_mode: str = "auto"  # "static": fixed-shape steps, a CUDA graph on CUDA; "auto": static on CUDA only
    top_k: int | None = None  # 0: no top-k filtering
    repetition_penalty: float | None = None  # 1.0: none; above 1 discourages tokens already in the sequence

    def __post_init__(self):
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS_LIMIT:
            raise AdaTPInputError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}], got {n!r}")
        t = self.temperature
        if t is not None and not (_is_number(t) and MIN_TEMPERATURE <= t < math.inf):
            raise AdaTPInputError(
                f"temperature must be a finite number of at least {MIN_TEMPERATURE:g}, got {t!r}: the logits are "
                "divided by it, so a smaller one overflows them (and is greedy decoding in effect). For deterministic "
                "answers decode greedily (do_sample off, --greedy); to sample, 0.7 to 1.0 is usual (1.0 is neutral).")
        p = self.top_p
        if p is not None and not (_is_number(p) and 0 < p <= 1):
            raise AdaTPInputError(f"top_p must be in (0, 1], got {p} (1.0 keeps every token)")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise AdaTPInputError(f"top_k must be an integer >= 0, got {k!r} (0 keeps every token)")
        r = self.repetition_penalty
        if r is not None and not (_is_number(r) and MIN_REPETITION_PENALTY <= r < math.inf):
            raise AdaTPInputError(
                f"repetition_penalty must be a finite number of at least {MIN_REPETITION_PENALTY:g}, got {r!r}: the "
                "logits of tokens already seen are divided by it, so a smaller one overflows them and the answer "
                "repeats itself. 1.0 is no penalty; 1.05 to 1.3 discourages repeats (on the nodes, 0 is the model's).")
        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            raise AdaTPInputError(f"do_sample must be true, false or unset, got {self.do_sample!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise AdaTPInputError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.decode_mode not in DECODE_MODES:
            raise AdaTPInputError(f"decode_mode must be one of {DECODE_MODES}, got {self.decode_mode!r}")

    def resolve(self, generation_config=None) -> "SamplingConfig":
        """Every unset setting filled in: the model's generation config (a transformers
        ``GenerationConfig``, a dict, or None), else transformers' global default.
        A value the model's config holds that is out of range is ignored (the default
        applies), so a damaged generation_config.json never stops an answer. A temperature
        in [0, MIN_TEMPERATURE) is the model's way to say "deterministic": it is raised to
        the floor, and below GREEDY_TEMPERATURE it means greedy unless do_sample is set."""
        filled = {}
        for name in MODEL_SETTINGS:
            if getattr(self, name) is not None:
                continue
            value = (generation_config.get(name) if isinstance(generation_config, dict)
                     else getattr(generation_config, name, None))
            if name == "temperature" and _is_number(value) and 0 <= value < MIN_TEMPERATURE:
                if value < GREEDY_TEMPERATURE and self.do_sample is None:
                    filled["do_sample"] = False
                value = MIN_TEMPERATURE
            if value is not None:
                try:
                    replace(self, **{name: _coerce(name, value)})
                except (AdaTPInputError, TypeError, ValueError):
                    value = None
            filled[name] = HF_DEFAULTS[name] if value is None else _coerce(name, value)
        return replace(self, **filled)

    @property
    def is_resolved(self) -> bool:
        return all(getattr(self, name) is not None for name in MODEL_SETTINGS)

    def settings(self) -> dict:
        """The settings that choose tokens, by name (for stats): those that act."""
        cfg = self if self.is_resolved else self.resolve()
        out = {"do_sample": cfg.do_sample, "repetition_penalty": float(cfg.repetition_penalty)}
        if cfg.do_sample:
            out.update(temperature=float(cfg.temperature), top_k=cfg.top_k, top_p=float(cfg.top_p), seed=cfg.seed)
        return out


# Nodes' widgets always hold a value, so the new optional inputs have one that means
# "the model's": repetition_penalty 0 (a real penalty is > 0) and top_k -1 (0 is "off").
# do_sample, temperature and top_p are Generate Answer's older widgets: their values are
# the workflow's (a saved workflow keeps its behaviour), never replaced by the model's.
WIDGET_MODEL_PENALTY = 0.0
WIDGET_MODEL_TOP_K = -1


def widget_settings(repetition_penalty: float = WIDGET_MODEL_PENALTY, top_k: int = WIDGET_MODEL_TOP_K) -> dict:
    """SamplingConfig fields from the nodes' repetition_penalty and top_k widgets: None
    (the model's) for the "model" values, else the value."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < WIDGET_MODEL_TOP_K:
        raise AdaTPInputError(f"top_k must be -1 (the model's), 0 (off) or a positive integer, got {top_k!r}")
    if not _is_number(repetition_penalty) or not repetition_penalty >= WIDGET_MODEL_PENALTY:
        raise AdaTPInputError(f"repetition_penalty must be 0 (the model's) or a number from {MIN_REPETITION_PENALTY:g} "
                              f"up, got {repetition_penalty!r} (1.0 is no penalty)")
    return {"repetition_penalty": None if repetition_penalty == WIDGET_MODEL_PENALTY else float(repetition_penalty),
            "top_k": None if top_k == WIDGET_MODEL_TOP_K else top_k}


def widget_sampling(repetition_penalty: float = WIDGET_MODEL_PENALTY, top_k: int = WIDGET_MODEL_TOP_K,
                    **fields) -> SamplingConfig:
    """The SamplingConfig of a node's widgets (Generate Answer, Caption Folder): ``fields`` as they
    are, the two optional widgets through ``widget_settings``. The nodes' VALIDATE_INPUTS call it
    with the values they have, so a node's validation and its run refuse the same values."""
    return SamplingConfig(**fields, **widget_settings(repetition_penalty, top_k))


def _is_number(value) -> bool:
    """A real number that is not a bool (NaN included: the range checks refuse it)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce(name: str, value):
    if name == "do_sample":
        return bool(value)
    if name == "top_k":
        return int(value)
    return float(value)


def settings_text(settings: dict) -> str:
    """One line for the stats: "greedy, repetition_penalty 1.05" or "sampling: temperature 0.7, ..."."""
    rest = [f"{k} {settings[k]:g}" for k in ("temperature", "top_k", "top_p") if k in settings]
    head = f"sampling (seed {settings['seed']}): " + ", ".join(rest) if settings.get("do_sample") else "greedy"
    return f"{head}, repetition_penalty {settings['repetition_penalty']:g}"


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor: scores [..., V]; seen [..., V] bool, the ids in the sequence."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def warp(scores: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k, top-p as transformers' logits warpers apply them, in that order;
    scores [B, V] -> [B, V] with the filtered ids at -inf."""
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if cfg.top_k:
        k = min(cfg.top_k, scores.shape[-1])
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -float("inf"))
    if cfg.top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - cfg.top_p)
        remove[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))
    return scores


def draw(probs: torch.Tensor, generators) -> torch.Tensor:
    """One categorical draw per row: probs [B, V] (rows sum to 1) -> [B] long, on the probs' device,
    row b drawn with ``generators[b]`` (its own state; None: torch's default generator).

    The exponential race that ``torch.multinomial(probs, 1)`` runs (ATen Distributions.cpp:
    argmax(p / q), q ~ Exp(1) drawn over the row), one ``exponential_`` per row from its own
    generator, so a seed gives the token that multinomial gave, and a row of a batch the token
    it gets alone. multinomial also checks the probabilities on the host first (two syncs);
    the floors on temperature and penalty keep them finite here (module docstring)."""
    q = torch.empty_like(probs)
    for row, generator in zip(q, generators):
        row.exponential_(1, generator=generator)
    return torch.argmax(probs / q, dim=-1)


def choose(scores: torch.Tensor, cfg: SamplingConfig, generators) -> torch.Tensor:
    """scores [B, V] float32 (penalised already) -> [B] token ids, on the scores' device:
    argmax, or a ``draw`` after ``warp`` with ``generators`` (one per row, or one generator for
    a single row). ``cfg`` must be resolved. No host sync."""
    if not cfg.do_sample:
        return torch.argmax(scores, dim=-1)
    if generators is None or isinstance(generators, torch.Generator):
        generators = [generators] * scores.shape[0]
    return draw(torch.softmax(warp(scores, cfg), dim=-1), generators)


class TokenChooser:
    """Chooses the tokens of one answer: the repetition penalty over the prompt and the
    tokens chosen so far (a device-side mask, no host sync), then ``choose``. One answer
    calls it; a batch of answers calls ``choose_rows`` over theirs (the same tokens).

    prompt_ids: the prompt's token ids (any device), or None for none.
    """

    def __init__(self, cfg: SamplingConfig, prompt_ids: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        self.cfg = cfg if cfg.is_resolved else cfg.resolve()
        self.generator = generator
        self.prompt_ids = prompt_ids
        self.seen = None  # [V + 1] bool on the logits' device; the last slot takes ids >= V

    def _history(self, vocab: int, device) -> torch.Tensor:
        """The seen mask [V + 1], made at the first call (the prompt's one copy to the device)."""
        if self.seen is None:
            self.seen = torch.zeros(vocab + 1, dtype=torch.bool, device=device)
            if self.prompt_ids is not None and self.prompt_ids.numel():
                ids = self.prompt_ids.reshape(-1).to(device=device, dtype=torch.long)
                self.seen[ids.clamp(0, vocab)] = True
        return self.seen

    def _penalise(self, logits: torch.Tensor) -> torch.Tensor:
        vocab = logits.shape[-1]
        return apply_repetition_penalty(logits, self._history(vocab, logits.device)[:vocab],
                                        self.cfg.repetition_penalty)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] float32 -> the chosen id, a 0-d long tensor on the logits' device."""
        return choose_rows([self], logits[None])[0]


def choose_rows(choosers: list[TokenChooser], logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> [B] long on the logits' device: row b's token as ``choosers[b]`` alone
    chooses it (its penalty history, its generator), all rows at once and with no host sync.

    The penalty is one gather and one scatter: the rows' masks stacked into [B, V + 1], the
    chosen ids scattered into it, and each chooser's mask then its row of that tensor (a view;
    the next stack copies it). The draw takes one ``exponential_`` per row from the row's own
    generator (``draw``). The choosers share one resolved cfg (a batch's)."""
    cfg = choosers[0].cfg
    scores = logits.float()
    penalty = cfg.repetition_penalty != 1.0
    if penalty:
        vocab, device = scores.shape[-1], scores.device
        masks = [c._history(vocab, device) for c in choosers]
        seen = masks[0][None] if len(masks) == 1 else torch.stack(masks)  # [B, V + 1]
        scores = apply_repetition_penalty(scores, seen[:, :vocab], cfg.repetition_penalty)
    tokens = choose(scores, cfg, [c.generator for c in choosers])
    if penalty:
        seen.scatter_(1, tokens[:, None], True)  # chosen ids are < V: never the last slot
        for chooser, row in zip(choosers, seen):
            chooser.seen = row
    return tokens


def next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> int:
    """logits: [V] float32 -> the chosen token id, with no history (no repetition penalty
    over earlier tokens; ``TokenChooser`` has it). Unset settings take transformers' defaults."""
    cfg = cfg if cfg.is_resolved else cfg.resolve()
    return int(choose(logits.float()[None], replace(cfg, repetition_penalty=1.0), generator)[0])


__all__ = ["DECODE_MODES", "HF_DEFAULTS", "MAX_NEW_TOKENS_LIMIT", "MIN_REPETITION_PENALTY", "MIN_TEMPERATURE",
           "SamplingConfig", "TokenChooser", "apply_repetition_penalty", "choose", "choose_rows", "draw",
           "next_token", "settings_text", "warp", "widget_sampling", "widget_settings", "WIDGET_MODEL_PENALTY",
           "WIDGET_MODEL_TOP_K", "WIDGETS"]


# The two optional inputs that Generate Answer and Caption Folder append last (ComfyUI specs).
WIDGETS = {
    "repetition_penalty": ("FLOAT", {
        "default": WIDGET_MODEL_PENALTY, "min": 0.0, "max": 3.0, "step": 0.01,
        "tooltip": "0: the model's (its generation_config.json, e.g. 1.05 for Qwen2.5-VL; 1.0 when it sets none). "
                   "1.0: no penalty. Above 1 discourages tokens already in the prompt or answer (fewer loops). "
                   "Other values start at 0.01: below it the logits it divides overflow."}),
    "top_k": ("INT", {
        "default": WIDGET_MODEL_TOP_K, "min": -1, "max": 1000,
        "tooltip": "Sampling only. -1: the model's (generation_config.json, else 50). 0: off. "
                   "N: draw from the N most likely tokens."}),
}
