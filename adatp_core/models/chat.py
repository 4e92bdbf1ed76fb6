"""Chat templates: read a model folder's template and split it around the video and the question."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import AdaTPInputError

_VIDEO_SENTINEL = "\x00ADATP_VIDEO\x00"
_QUESTION_SENTINEL = "\x00ADATP_QUESTION\x00"


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
