"""A tiny random LLaVA-OneVision, built from configs in code (no download).

It has the real token layout (SigLIP at 384 px, patch 14 -> 27x27 patches, pooled
to 14x14 = 196 tokens per frame, one newline token after the video) and a real
byte-level BPE tokenizer trained locally with ``tokenizers``, so every code path
that runs on llava-hf/llava-onevision-qwen2-*-ov-hf also runs on it. Its weights
are random: its answers are fluent-looking noise, which is enough for exactness
tests, the embedded default and trying the pack without downloads.

The model is written with ``save_pretrained`` into a cache folder and loaded back
through the same safe loader that users' models go through.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from ..paths import default_cache_dir

log = logging.getLogger(__name__)

TINY_MODEL_NAME = "adatp-tiny-llava-onevision (built-in, random weights)"
# Bump when anything below changes, so that stale caches are rebuilt.
TINY_MODEL_VERSION = 2
TINY_MODEL_FOLDER = f"tiny-llava-onevision-v{TINY_MODEL_VERSION}"  # under the cache

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

# The chat template of llava-hf/llava-onevision-qwen2-*-ov-hf (processor level).
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Video preprocessing of llava-hf/llava-onevision-qwen2-*-ov-hf (SigLIP normalisation).
LLAVA_ONEVISION_VIDEO_PREPROCESSOR = {
    "video_processor_type": "LlavaOnevisionVideoProcessor",
    "processor_class": "LlavaOnevisionProcessor",
    "do_resize": True,
    "size": {"height": 384, "width": 384},
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_convert_rgb": True,
}

_CORPUS = """
the a an of in on at to from with by for and or but not is are was were be been
this that these those there here what who where when why how which does do did
video frame scene shows person people man woman child dog cat car road street
room table kitchen door window tree sky water ball red green blue yellow white
black left right up down moves moving walks runs sits stands holds opens closes
first then after before finally begins ends while during small large bright dark
describe detail happening happens question answer yes no maybe number count two
three four five camera zoom pan cut slowly quickly square circle line shape color
"""


def build_tokenizer(special_tokens=SPECIAL_TOKENS, named_tokens=None):
    """A byte-level BPE tokenizer with Qwen2's chat special tokens, trained in code.

    named_tokens: extra_special_tokens for the tokenizer (LLaVA-OV's image and video tokens by default).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = _CORPUS.split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=named_tokens if named_tokens is not None else {
            "image_token": "<image>", "video_token": "<video>"},
    )


def build_tiny_model(tokenizer, seed: int = 0):
    """A random 2-layer SigLIP + 4-layer Qwen2 LLaVA-OneVision, in float32.

    initializer_range 0.2 keeps a random model from repeating one token, so
    equality tests between two decoding paths are meaningful.
    """
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers import Qwen2Config, SiglipVisionConfig

    vocab = len(tokenizer)
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=384, patch_size=14, vision_use_head=False, initializer_range=0.2,
    )
    text = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=32768,
        tie_word_embeddings=False, initializer_range=0.2,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )
    config.initializer_range = 0.2
    torch.manual_seed(seed)
    return finish_tiny_model(LlavaOnevisionForConditionalGeneration(config).eval(), tokenizer)


def finish_tiny_model(model, tokenizer):
    """Shared by the tiny models: words over bytes, and Qwen's EOS and pad tokens."""
    import torch

    # Cosmetic: shrink the output rows of tokens that are not whole words (raw bytes,
    # punctuation), so the random model babbles in words rather than in broken UTF-8.
    with torch.no_grad():
        for token, idx in tokenizer.get_vocab().items():
            word = tokenizer.convert_tokens_to_string([token]).strip()
            if not (len(word) > 1 and word.isascii() and word.isalpha()):
                model.lm_head.weight[idx] *= 0.05
    model.generation_config.eos_token_id = [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return model


# The image processor class that goes with each video processor (transformers 5.24).
_IMAGE_PROCESSOR = {"LlavaOnevisionVideoProcessor": "LlavaOnevisionImageProcessor",
                    "Qwen2VLVideoProcessor": "Qwen2VLImageProcessor", "Qwen3VLVideoProcessor": "Qwen2VLImageProcessor"}
LAYOUTS = ("separate", "transformers5")


def save_model_folder(model, tokenizer, folder: Path, chat_template: str = LLAVA_ONEVISION_CHAT_TEMPLATE,
                      video_preprocessor: dict = LLAVA_ONEVISION_VIDEO_PREPROCESSOR, layout: str = "separate") -> None:
    """Write a model folder laid out like the Hugging Face repos': safetensors,
    tokenizer, processor chat template and video preprocessor config.

    layout "separate": chat_template.json and video_preprocessor_config.json, as the
    catalog's repositories have them. "transformers5": what transformers 5.24's
    ``processor.save_pretrained`` writes: processor_config.json with the image and
    video processors nested in it, and chat_template.jinja.
    """
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_processor_files(folder, chat_template, video_preprocessor, layout)


def write_processor_files(folder: Path, chat_template: str, video_preprocessor: dict, layout: str) -> None:
    """The chat template and video processor files of ``save_model_folder``'s ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "separate":
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}, indent=2))
        (folder / "video_preprocessor_config.json").write_text(json.dumps(video_preprocessor, indent=2))
        return
    video = {k: v for k, v in video_preprocessor.items() if k != "processor_class"}
    image = {k: v for k, v in video.items() if k not in ("video_processor_type", "do_sample_frames", "fps",
                                                         "min_frames", "max_frames", "max_video_tokens")}
    image["image_processor_type"] = _IMAGE_PROCESSOR[video["video_processor_type"]]
    processor = {"image_processor": image, "processor_class": video_preprocessor["processor_class"],
                 "video_processor": video}
    if video["video_processor_type"] == "LlavaOnevisionVideoProcessor":
        processor.update(image_token="<image>", video_token="<video>", num_image_tokens=None,
                         vision_feature_select_strategy=None)
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")
    (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """Return the folder of the built-in tiny model, building it on first use."""
    return ensure_built(cache_dir, TINY_MODEL_FOLDER, write_tiny_folder)


def write_tiny_folder(folder: Path) -> None:
    tokenizer = build_tokenizer()
    save_model_folder(build_tiny_model(tokenizer), tokenizer, folder)


def ensure_built(cache_dir: Path | None, name: str, write) -> Path:
    """The folder ``name`` under the cache, written by ``write(folder)`` on first use.

    Built into a temporary folder and renamed into place, so two processes that
    race for it both end up with a complete folder.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / name
    if (folder / "config.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    log.info("building the built-in tiny model into %s", folder)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        write(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
