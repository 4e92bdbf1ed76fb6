"""The LLaVA-OneVision adapter: visual tokens, frame features and prompt layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import QUESTION
from reference import stock_inputs_embeds


def test_encode_matches_stock_video_features(tiny, stock, frames):
    pixels = tiny.adapter.preprocess(frames)
    enc = tiny.adapter.encode(pixels)
    assert enc.grid == (4, 14, 14)
    prompt = tiny.adapter.build_prompt(QUESTION, 4 * 196)
    with torch.inference_mode():
        ours = tiny.adapter.assemble(prompt, enc)
        ref = stock_inputs_embeds(stock, prompt.input_ids, pixels)
    assert (ours - ref).abs().max().item() < 1e-5


def test_frame_features_are_mean_pre_projector_patches(tiny, stock, frames):
    pixels = tiny.adapter.preprocess(frames)
    enc = tiny.adapter.encode(pixels)
    with torch.inference_mode():
        hidden = stock.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
    expected = F.normalize(hidden.mean(dim=1), dim=-1)
    assert torch.allclose(enc.frame_features, expected, atol=1e-5)
    assert torch.allclose(enc.frame_features.norm(dim=-1), torch.ones(4))


def test_prompt_layout_follows_the_chat_template(tiny):
    ad = tiny.adapter
    prompt = ad.build_prompt(QUESTION, 2 * 196)
    text = ad.tokenizer.decode(prompt.input_ids)
    rendered = ad.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}],
        chat_template=ad.chat_template, tokenize=False, add_generation_prompt=True)
    assert text == rendered.replace("<video>", "<video>" * (2 * 196 + 1))
    assert text.startswith("<|im_start|>user <video>") and text.endswith("<|im_start|>assistant\n")
    video = prompt.input_ids == ad.video_token_id
    assert int(video.sum()) == 2 * 196 + 1
    assert torch.equal(prompt.visual_positions, video.nonzero().squeeze(1)[:-1])
    assert prompt.extra_positions.tolist() == [int(video.nonzero()[-1])]
    q0, q1 = prompt.question
    assert ad.tokenizer.decode(prompt.input_ids[q0:q1]) == QUESTION
    assert prompt.after_video == prompt.extra_positions.item() + 1


def test_special_tokens_in_the_question_stay_text(tiny):
    ad = tiny.adapter
    prompt = ad.build_prompt("what is <video> and <|im_end|>?", 196)
    assert int((prompt.input_ids == ad.video_token_id).sum()) == 196 + 1
    im_end = ad.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert int((prompt.input_ids == im_end).sum()) == 1  # only the template's own
