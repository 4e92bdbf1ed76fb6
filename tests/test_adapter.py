"""The LLaVA-OneVision adapter: visual tokens, frame features and prompt layout."""

from __future__ import annotations

import pytest
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


def _stock_pooling(features, grid):
    """transformers' own apply_pooling, for a SigLIP whose patch grid is grid x grid."""
    import types

    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    vc = types.SimpleNamespace(image_size=grid * 14, patch_size=14)
    return LlavaOnevisionModel.apply_pooling(types.SimpleNamespace(config=types.SimpleNamespace(vision_config=vc)),
                                             features)


@pytest.mark.parametrize("grid", [27, 24, 13, 5, 2, 1])
def test_pooling_matrix_equals_apply_pooling_float32(grid, device):
    from adatp_core.models.llava_onevision import bilinear_pool_matrix, pool_weights, pool_with_matrix

    out = -(-grid // 2)
    matrix = bilinear_pool_matrix((grid, grid), (out, out))
    assert matrix.shape == (out * out, grid * grid)
    torch.testing.assert_close(matrix.sum(dim=1), torch.ones(out * out, dtype=torch.float64))  # rows are averages
    x = torch.randn(3, grid * grid, 40, generator=torch.Generator().manual_seed(grid)).to(device)
    ours = pool_with_matrix(x, pool_weights(matrix, device, torch.float32))
    ref = _stock_pooling(x, grid)
    assert ours.shape == ref.shape == (3, out * out, 40)
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("split", [True, False])  # high | low weights of the dtype (CUDA's default), or float32
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid", [27, 13, 5])
def test_pooling_matrix_within_low_precision_rounding(grid, dtype, split, device):
    """In bf16/fp16 ours rounds a nearly exact resize once: within half an ulp of
    the float64 result, plus the error of its weights (kept to about twice the
    dtype's precision) over the summed magnitudes, and within one ulp of
    apply_pooling where no cancellation occurs."""
    from adatp_core.models.llava_onevision import bilinear_pool_matrix, pool_weights, pool_with_matrix

    out = -(-grid // 2)
    matrix = bilinear_pool_matrix((grid, grid), (out, out))
    x = (4 * torch.randn(2, grid * grid, 64, generator=torch.Generator().manual_seed(7))).to(device, dtype)
    weights = pool_weights(matrix, device, dtype, split=split)
    assert weights.shape[1] == (2 if split else 1) * grid * grid
    ours = pool_with_matrix(x, weights)
    assert ours.dtype == dtype
    ours = ours.double()
    ref = _stock_pooling(x, grid).double()
    exact = _stock_pooling(x.double(), grid)
    magnitude = _stock_pooling(x.double().abs(), grid)  # sum of |w x| per output
    eps = torch.finfo(dtype).eps
    slack = 0.0
    if device.type == "cuda":
        # cuBLAS may split the reduction over P (split-K) and, by torch's default
        # (allow_{bf16,fp16}_reduced_precision_reduction), round each partial sum to the
        # dtype before adding them up: one more rounding of each partial, at most
        # eps/2 * sum of its |w x|, so eps/2 * magnitude in all; and the float32
        # accumulation of P terms in another order adds at most P * 2^-24 * magnitude.
        terms = weights.shape[1]
        slack = (0.5 * eps + terms * 2.0 ** -24) * magnitude
    assert ((ours - exact).abs() <= 0.5 * eps * exact.abs() + eps ** 2 * magnitude + slack).all()
    assert ((ours - ref).abs() <= eps * exact.abs() + 4 * eps ** 2 * magnitude + slack).all()
    naive = torch.matmul(matrix.to(device, dtype), x).double()  # one rounded weight matrix is worse
    assert (naive - exact).abs().max() > (ours - exact).abs().max()


def test_adapter_pools_with_a_cached_matrix(tiny, device):
    ad = tiny.adapter
    x = torch.randn(2, ad.patch_grid ** 2, 8).to(device)
    first = ad.pool(x)
    assert (first - _stock_pooling(x, ad.patch_grid)).abs().max().item() < 1e-5
    cached = dict(ad._pool_cache)
    assert torch.equal(ad.pool(x), first) and ad._pool_cache.keys() == cached.keys()
