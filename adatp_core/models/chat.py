"""Chat templates: read a model folder's template and split it around the video and the question."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

from ..errors import AdaTPInputError

log = logging.getLogger(__name__)

# Passed to every chat template, so the prompt is the same whatever a template's own default: the
# larger Qwen3.5 / Qwen3.6 templates (and Qwen3's) think unless told not to, the 0.8B's defaults to
# thinking off; the switch (an empty thinking block after the assistant's turn starts) is how answers
# come without one. Templates that do not know the variable ignore it.
TEMPLATE_KWARGS = {"enable_thinking": False}

_VIDEO_SENTINEL = "\x00ADATP_VIDEO\x00"
_QUESTION_SENTINEL = "\x00ADATP_QUESTION\x00"
_ANSWER_SENTINEL = "\x00ADATP_ANSWER\x00"
_TRAILING_PROBE = " \n"  # whitespace after the question: kept, or trimmed by the template


def _json_field(path: Path, key: str):
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def _default_template(value) -> str | None:
    """A template string, or the "default" one of a list of named templates."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return _default_template(named.get("default"))
    return None


def folder_chat_template(folder: Path) -> str | None:
    """The chat template saved in a model folder, or None.

    In transformers 5.24's order: chat_template.json (the legacy processor file), then
    chat_template.jinja (what ``processor.save_pretrained`` writes since 4.5x), then a
    "chat_template" left inside processor_config.json, then the tokenizer's
    (tokenizer_config.json).
    """
    folder = Path(folder)
    js = folder / "chat_template.json"
    if js.is_file() and (template := _default_template(_json_field(js, "chat_template"))):
        return template
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            if template := jinja.read_text(encoding="utf-8"):
                return template
        except (OSError, UnicodeDecodeError):
            pass
    for name in ("processor_config.json", "tokenizer_config.json"):
        if (folder / name).is_file() and (template := _default_template(_json_field(folder / name, "chat_template"))):
            return template
    return None


def read_chat_template(folder: Path, tokenizer) -> str:
    """The folder's chat template (``folder_chat_template``), else the tokenizer's."""
    template = folder_chat_template(folder) or _default_template(getattr(tokenizer, "chat_template", None))
    if template:
        return template
    raise AdaTPInputError(
        f"{folder} has no chat template (chat_template.jinja or chat_template.json); copy it from the model's "
        "Hugging Face repository into the folder."
    )


class TemplateParts(NamedTuple):
    """One user turn's template around the video and the question.

    before, middle, after: token ids of the template text before the video, between the
    video and the question, after the question (the generation prompt included).
    lead, trail: the template text that touches the question with no special token in
    between (LLaVA-OV's newline after <video>). It is tokenized together with the
    question (``question_tokens``), as the processor tokenizes the whole rendered string:
    byte-level BPE merges across that seam (a question that starts with a newline gives
    "ĊĊ", not "Ċ", "Ċ"). ``middle`` and ``after`` hold the rest, so they do not depend
    on the question.
    trim: the template drops whitespace at the end of the question (Qwen3.5 renders the
    user's content through ``|trim``); ``question_tokens`` drops it too.
    """

    before: list[int]
    middle: list[int]
    after: list[int]
    lead: str = ""
    trail: str = ""
    trim: bool = False  # the template strips whitespace at the end of the user's turn (Qwen3.5's |trim)
    thinks: bool = False  # the generation prompt opens a thinking block that no switch closes


def _added_token_spans(tokenizer, text: str) -> list[tuple[int, int]]:
    """(start, end) of every added token's text in ``text`` (where the tokenizer splits first)."""
    spans = []
    for token in getattr(tokenizer, "get_added_vocab", dict)():
        start = text.find(token)
        while token and start >= 0:
            spans.append((start, start + len(token)))
            start = text.find(token, start + 1)
    return spans


def render_user_turn(tokenizer, chat_template: str, question: str) -> str:
    """The template's text for one user turn (a video, then ``question``) and the generation
    prompt. A template that raises (its own ``raise_exception``, a syntax error) is bad input
    of the model folder: AdaTPInputError, with what to do."""
    import jinja2

    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    try:
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=True, **TEMPLATE_KWARGS)
    except jinja2.TemplateError as exc:
        raise AdaTPInputError(
            f"this model's chat template cannot render a question about a video ({type(exc).__name__}: "
            f"{str(exc)[:200]}); use the chat template (chat_template.jinja or chat_template.json) of the "
            "model's Hugging Face repository") from exc


def end_of_turn_id(tokenizer, chat_template: str) -> int | None:
    """The token the template writes right after the assistant's answer (``<|im_end|>`` for every
    family here), or None when the template ends the turn with plain text or cannot render one.

    A folder without generation_config.json leaves transformers with the tokenizer's eos alone,
    which for some tokenizers is not the end of the turn (``<|endoftext|>``): stock ``generate()``
    then runs on to max_new_tokens. The adapters stop here too (``eos_token_ids``)."""
    import jinja2

    messages = [{"role": "user", "content": [{"type": "text", "text": "Q"}]},
                {"role": "assistant", "content": [{"type": "text", "text": _ANSWER_SENTINEL}]}]
    try:
        rendered = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                                 **TEMPLATE_KWARGS)
    except (jinja2.TemplateError, TypeError, ValueError) as exc:
        log.debug("the chat template cannot render an assistant's turn (%s)", exc)
        return None
    if _ANSWER_SENTINEL not in rendered:
        return None
    tail = rendered.split(_ANSWER_SENTINEL, 1)[1]
    spans = [(start, end) for start, end in _added_token_spans(tokenizer, tail) if not tail[:start].strip()]
    if not spans:
        return None
    start, end = min(spans)
    token_id = tokenizer.convert_tokens_to_ids(tail[start:end])
    return int(token_id) if isinstance(token_id, int) and token_id >= 0 else None


def split_template(tokenizer, chat_template: str, video_text: str) -> TemplateParts:
    """Render one user turn (a video, then the question) with sentinels and split it
    into ``TemplateParts``.

    video_text: what the template writes for the video's placeholder (LLaVA-OV: "<video>";
        Qwen: "<|video_pad|>", inside its <|vision_start|>...<|vision_end|>).
    """
    def render(question: str) -> str:
        return render_user_turn(tokenizer, chat_template, question)

    rendered = render(_QUESTION_SENTINEL)
    trim = _QUESTION_SENTINEL + _TRAILING_PROBE not in render(_QUESTION_SENTINEL + _TRAILING_PROBE)
    rendered = rendered.replace(video_text, _VIDEO_SENTINEL, 1)
    if rendered.count(_VIDEO_SENTINEL) != 1 or rendered.count(_QUESTION_SENTINEL) != 1:
        raise AdaTPInputError(
            f"this model's chat template does not place one {video_text} and the question; "
            "use the chat_template.json of the model's Hugging Face repository")
    before, rest = rendered.split(_VIDEO_SENTINEL)
    middle, after = rest.split(_QUESTION_SENTINEL)
    if not before:
        raise AdaTPInputError("unexpected chat template layout")
    cut_middle = max((end for _, end in _added_token_spans(tokenizer, middle)), default=0)
    cut_after = min((start for start, _ in _added_token_spans(tokenizer, after)), default=len(after))
    opened, closed = after.rfind("<think>"), after.rfind("</think>")
    thinks = opened > closed  # a -Thinking model: its template has no switch to turn it off
    if thinks:
        log.warning("this model's chat template opens a thinking block that enable_thinking=False does not "
                    "close (a -Thinking model): answers and captions start with the model's reasoning. "
                    "Use the model's -Instruct version for plain answers.")
    ids = [tokenizer(part, add_special_tokens=False)["input_ids"] for part in (before, middle[:cut_middle],
                                                                                after[cut_after:])]
    return TemplateParts(*ids, lead=middle[cut_middle:], trail=after[:cut_after], trim=trim, thinks=thinks)


def question_tokens(tokenizer, parts: TemplateParts, question: str) -> tuple[list[int], int, int]:
    """(ids of lead + question + trail, tokenized as one string, and the [start, end) of
    the tokens that hold the question's text). Special-token text in the question
    (<video>, <|im_end|>) is split into ordinary tokens, so it can never create a
    placeholder. A token that spans the seam counts as the question's."""
    if parts.trim:  # what the template itself does to the question's end
        question = question.rstrip()
    text = parts.lead + question + parts.trail
    q0, q1 = len(parts.lead), len(parts.lead) + len(question)
    try:
        enc = tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, KeyError, TypeError, ValueError):  # a slow tokenizer: no offsets
        lead, q, trail = (tokenize_question(tokenizer, t) if t else [] for t in (parts.lead, question, parts.trail))
        return lead + q + trail, len(lead), len(lead) + len(q)
    inside = [i for i, (a, b) in enumerate(offsets) if a < q1 and b > q0]
    if not inside:  # an empty question: where it would be
        at = sum(1 for a, b in offsets if b <= q0)
        return list(enc["input_ids"]), at, at
    return list(enc["input_ids"]), inside[0], inside[-1] + 1


def tokenize_question(tokenizer, question: str) -> list[int]:
    """The question's own tokens. Special-token text in it (<video>, <|im_end|>)
    is split into ordinary tokens, so it can never create a placeholder."""
    return tokenizer(question, add_special_tokens=False, split_special_tokens=True)["input_ids"]


PROBE_QUESTIONS = ("Why?", "Describe every person, object and event in this clip, in order of appearance.")


def video_prefix_refusal(tokenizer, chat_template: str, video_text: str) -> str | None:
    """Why a new question could not reuse a video's prefix with this template (None: it can).

    Renders one user turn with two different questions, tokenizes each rendering whole,
    and compares the token ids up to and including the video's placeholder: they must
    be identical for the prefix to be question-independent.
    """
    video_id = tokenizer.convert_tokens_to_ids(video_text)
    heads = []
    for question in PROBE_QUESTIONS:
        ids = tokenizer(render_user_turn(tokenizer, chat_template, question), add_special_tokens=False)["input_ids"]
        if video_id not in ids:
            return f"the chat template does not write {video_text} as one token"
        heads.append(ids[:ids.index(video_id) + 1])
    if heads[0] != heads[1]:
        return "the chat template puts question-dependent tokens before the video"
    return None
