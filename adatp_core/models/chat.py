"""Chat templates: read a model folder's template and split it around the video and the question."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import AdaTPInputError

_VIDEO_SENTINEL = "\x00ADATP_VIDEO\x00"
_QUESTION_SENTINEL = "\x00ADATP_QUESTION\x00"


def read_chat_template(folder: Path, tokenizer) -> str:
    """The processor's chat template (chat_template.json or .jinja), else the tokenizer's."""
    folder = Path(folder)
    js = folder / "chat_template.json"
    if js.is_file():
        template = json.loads(js.read_text()).get("chat_template")
        if template:
            return template
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise AdaTPInputError(
        f"{folder} has no chat template (chat_template.json); copy it from the model's "
        "Hugging Face repository into the folder."
    )


def split_template(tokenizer, chat_template: str, video_text: str) -> tuple[list[int], list[int], list[int]]:
    """Render one user turn (a video, then the question) with sentinels and return the
    token ids of the literal text before the video, between video and question, and
    after the question (the generation prompt included).

    video_text: what the template writes for the video's placeholder (LLaVA-OV: "<video>";
        Qwen: "<|video_pad|>", inside its <|vision_start|>...<|vision_end|>).
    """
    messages = [{"role": "user", "content": [
        {"type": "video"}, {"type": "text", "text": _QUESTION_SENTINEL}]}]
    rendered = tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True)
    rendered = rendered.replace(video_text, _VIDEO_SENTINEL, 1)
    if rendered.count(_VIDEO_SENTINEL) != 1 or rendered.count(_QUESTION_SENTINEL) != 1:
        raise AdaTPInputError(
            f"this model's chat template does not place one {video_text} and the question; "
            "use the chat_template.json of the model's Hugging Face repository")
    before, rest = rendered.split(_VIDEO_SENTINEL)
    middle, after = rest.split(_QUESTION_SENTINEL)
    if not before:
        raise AdaTPInputError("unexpected chat template layout")
    return tuple(tokenizer(part, add_special_tokens=False)["input_ids"] for part in (before, middle, after))


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
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        rendered = tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        if video_id not in ids:
            return f"the chat template does not write {video_text} as one token"
        heads.append(ids[:ids.index(video_id) + 1])
    if heads[0] != heads[1]:
        return "the chat template puts question-dependent tokens before the video"
    return None
