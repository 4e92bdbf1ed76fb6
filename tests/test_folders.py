"""Model folders as transformers 5 saves them (processor_config.json with the image and
video processors nested in it, chat_template.jinja), as the catalog's repositories have
them (the separate files), and the mixed cases in between, for every family."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from conftest import QUESTION

from adatp_core.errors import AdaTPInputError
from adatp_core.models.loader import check_model_folder, load_video_llm
from adatp_core.models.tiny import ensure_tiny_model, write_processor_files
from adatp_core.models.tiny_qwen import ensure_tiny_qwen2_5_vl, ensure_tiny_qwen3_vl

FAMILIES = {"llava_onevision": ensure_tiny_model, "qwen2_5_vl": ensure_tiny_qwen2_5_vl,
            "qwen3_vl": ensure_tiny_qwen3_vl}
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
SEPARATE_FILES = ("chat_template.json", "video_preprocessor_config.json")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("adatp-folders-cache")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def separate(family, cache):
    """The built-in tiny model of the family, in the catalog repositories' layout."""
    return FAMILIES[family](cache)


@pytest.fixture(scope="module")
def reference(separate):
    return load_video_llm(separate, device="cpu", dtype="float32")


def saved_files(folder):
    """(chat template, video processor settings) that ``folder``'s separate files hold."""
    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    return template, json.loads((folder / "video_preprocessor_config.json").read_text())


def transformers5_copy(separate, dest):
    """The same model re-saved in transformers 5.24's processor layout (no separate files)."""
    shutil.copytree(separate, dest)
    template, video = saved_files(separate)
    for name in SEPARATE_FILES:
        (dest / name).unlink()
    write_processor_files(dest, template, video, "transformers5")
    return dest


def same_prompting(llm, reference):
    """The loaded folder preprocesses and prompts exactly as the reference does."""
    a, b = llm.adapter, reference.adapter
    assert a.preprocess_config == b.preprocess_config
    assert a.chat_template == b.chat_template
    assert a._template_parts == b._template_parts
    plan = b.plan_video(4, 96, 128)
    assert torch.equal(a.build_prompt(QUESTION, plan).input_ids, b.build_prompt(QUESTION, plan).input_ids)


def test_transformers5_layout_loads(family, separate, reference, tmp_path):
    folder = transformers5_copy(separate, tmp_path / "v5")
    assert not any((folder / name).exists() for name in (*SEPARATE_FILES, "preprocessor_config.json"))
    nested = json.loads((folder / "processor_config.json").read_text())
    assert {"image_processor", "video_processor", "processor_class"} <= set(nested)
    same_prompting(load_video_llm(folder, device="cpu", dtype="float32"), reference)


def test_mixed_layouts(family, separate, reference, tmp_path):
    template, video = saved_files(separate)
    # transformers' order: the nested video processor first, even beside a separate file
    folder = transformers5_copy(separate, tmp_path / "nested-first")
    (folder / "video_preprocessor_config.json").write_text(json.dumps({**video, "image_mean": [0.1] * 3}))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (folder / "chat_template.jinja").write_text("{{ 'not this one' }}")  # the legacy .json comes first
    same_prompting(load_video_llm(folder, device="cpu", dtype="float32"), reference)

    # a legacy processor_config.json (no nested processors, as llava-hf repositories have), separate files
    folder = shutil.copytree(separate, tmp_path / "legacy")
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": video["processor_class"],
                                                              "num_image_tokens": 729}))
    same_prompting(load_video_llm(folder, device="cpu", dtype="float32"), reference)

    # the nested processors with only an image processor, and the video one beside it; the jinja template
    folder = transformers5_copy(separate, tmp_path / "image-only")
    nested = json.loads((folder / "processor_config.json").read_text())
    (folder / "video_preprocessor_config.json").write_text(json.dumps(nested.pop("video_processor")))
    (folder / "processor_config.json").write_text(json.dumps(nested))
    same_prompting(load_video_llm(folder, device="cpu", dtype="float32"), reference)


def test_missing_or_damaged_processor_files_are_explained(separate, tmp_path):
    folder = transformers5_copy(separate, tmp_path / "none")
    nested = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": nested["processor_class"]}))
    with pytest.raises(AdaTPInputError, match="processor_config.json with a video_processor entry"):
        check_model_folder(folder)
    (folder / "processor_config.json").write_text("{not json")
    with pytest.raises(AdaTPInputError, match="processor_config.json cannot be read as JSON"):
        check_model_folder(folder)
    (folder / "processor_config.json").write_text(json.dumps(nested))
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(AdaTPInputError, match="chat template"):
        check_model_folder(folder)


def test_answers_alike_in_both_layouts(separate, reference, tmp_path, family):
    from adatp_core.attention import extract_attention
    from adatp_core.generate import SamplingConfig, generate_answer
    from adatp_core.samples import scene_frames

    if family != "qwen3_vl":  # one family is enough: the loading itself is checked above for all
        pytest.skip("checked on qwen3_vl")
    frames = torch.from_numpy(scene_frames(num_frames=4, width=128, height=96, scenes=2)).float() / 255
    llm = load_video_llm(transformers5_copy(separate, tmp_path / "v5"), device="cpu", dtype="float32")
    cfg = SamplingConfig(max_new_tokens=4)
    ours = generate_answer(extract_attention(llm, frames, QUESTION, 2), cfg)
    assert ours.token_ids == generate_answer(extract_attention(reference, frames, QUESTION, 2), cfg).token_ids


PROCESSORS = {"llava_onevision": ("LlavaOnevisionProcessor", "LlavaOnevisionImageProcessor",
                                  "LlavaOnevisionVideoProcessor"),
              "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor"),
              "qwen3_vl": ("Qwen3VLProcessor", "Qwen2VLImageProcessor", "Qwen3VLVideoProcessor")}


@pytest.mark.skipif(not HAS_TORCHVISION, reason="transformers' processors need torchvision (not on CI)")
def test_real_processor_save_pretrained(family, separate, reference, tmp_path):
    """The folder that transformers' own ``processor.save_pretrained`` writes loads the same,
    and our hand-written layout matches it file for file."""
    import transformers

    template, video = saved_files(separate)
    names = PROCESSORS[family]
    kwargs = {k: v for k, v in video.items() if k not in ("video_processor_type", "processor_class")}
    processor = getattr(transformers, names[0])(
        image_processor=getattr(transformers, names[1])(), video_processor=getattr(transformers, names[2])(**kwargs),
        tokenizer=transformers.AutoTokenizer.from_pretrained(separate), chat_template=template)
    folder = shutil.copytree(separate, tmp_path / "real")
    for name in SEPARATE_FILES:
        (folder / name).unlink()
    processor.save_pretrained(folder)
    assert not (folder / "video_preprocessor_config.json").exists() and (folder / "chat_template.jinja").is_file()
    same_prompting(load_video_llm(folder, device="cpu", dtype="float32"), reference)

    ours = transformers5_copy(separate, tmp_path / "ours")
    theirs = json.loads((folder / "processor_config.json").read_text())
    mine = json.loads((ours / "processor_config.json").read_text())
    assert set(mine) <= set(theirs) and mine["processor_class"] == theirs["processor_class"]
    for key in ("size", "resample", "image_mean", "image_std", "rescale_factor", "patch_size", "merge_size",
                "temporal_patch_size"):
        assert mine["video_processor"].get(key) == theirs["video_processor"].get(key), key
    assert (ours / "chat_template.jinja").read_text() == (folder / "chat_template.jinja").read_text()
