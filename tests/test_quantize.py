"""4/8-bit loading through bitsandbytes: what can be checked without a GPU.

The refusals (no GPU, CPU device, bitsandbytes missing or too old) come before any
weight is read; the config keeps the vision side and lm_head unquantized; and the
AdaTP stages never read a Linear layer's weight, so they run unchanged on layers
whose ``weight`` is a packed integer buffer, as bitsandbytes' Linear4bit is.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import QUESTION, LoaderStopped

from adatp_core.attention import extract_attention
from adatp_core.debias import global_debias, local_debias
from adatp_core.errors import AdaTPEnvironmentError, AdaTPInputError
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.models import quantize
from adatp_core.models.llava_onevision import LlavaOnevisionAdapter
from adatp_core.models.loader import load_video_llm
from adatp_core.prune import prune_tokens


@pytest.fixture
def unreadable_weights(tiny_dir, tmp_path):
    """The tiny model's folder with weights that fail if anything reads them."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    (folder / "model.safetensors").write_bytes(b"reading this is a bug")
    return folder


@pytest.mark.parametrize("choice", list(quantize.QUANTIZED_DTYPES))
def test_refused_without_a_gpu(unreadable_weights, monkeypatch, choice):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AdaTPEnvironmentError, match="NVIDIA GPU"):
        load_video_llm(unreadable_weights, device="auto", dtype=choice)


def test_refused_on_a_cpu_device(unreadable_weights, fake_cuda):
    with pytest.raises(AdaTPInputError, match="device cpu"):
        load_video_llm(unreadable_weights, device="cpu", dtype="bnb-4bit")


def test_refused_without_bitsandbytes(unreadable_weights, fake_cuda, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(AdaTPEnvironmentError, match=r"bitsandbytes.*pip install"):
        load_video_llm(unreadable_weights, device="cuda", dtype="bnb-8bit")


def test_refused_with_an_old_bitsandbytes(unreadable_weights, fake_cuda, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setattr(quantize.importlib.metadata, "version", lambda name: "0.45.5")
    with pytest.raises(AdaTPEnvironmentError, match=r"0\.48.*found 0\.45\.5"):
        load_video_llm(unreadable_weights, device="cuda", dtype="bnb-4bit")


@pytest.mark.parametrize("choice", list(quantize.QUANTIZED_DTYPES))
def test_loader_asks_transformers_for_bitsandbytes(unreadable_weights, fake_cuda, stop_at_from_pretrained,
                                                   monkeypatch, choice):
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setattr(quantize.importlib.metadata, "version", lambda name: "0.50.2")
    seen = stop_at_from_pretrained
    with pytest.raises(LoaderStopped):
        load_video_llm(unreadable_weights, device="cuda", dtype=choice)
    cfg = seen["quantization_config"]
    assert seen["dtype"] == torch.bfloat16 and seen["device_map"] == {"": torch.device("cuda", 0)}  # indexed
    if choice == "bnb-4bit":
        assert cfg.load_in_4bit and not cfg.load_in_8bit
        assert cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_compute_dtype == torch.bfloat16
    else:
        assert cfg.load_in_8bit and not cfg.load_in_4bit
    assert cfg.llm_int8_skip_modules == list(LlavaOnevisionAdapter.unquantized_modules)


def test_only_the_llm_decoder_layers_are_quantized(tiny):
    """transformers' own matching of the skip list against the model's module names: every
    Linear of the decoder layers is converted; the vision tower, projector and lm_head are not."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = list(quantize.bitsandbytes_config("bnb-4bit", torch.bfloat16,
                                             tiny.adapter.unquantized_modules).llm_int8_skip_modules)
    decoder = {id(m) for m in tiny.adapter.text_model.layers.modules()}
    linears = [(name, m) for name, m in tiny.model.named_modules() if isinstance(m, torch.nn.Linear)]
    converted = {name for name, m in linears if should_convert_module(name, skip)}
    assert converted == {name for name, m in linears if id(m) in decoder}
    assert any("vision_tower" in name for name, _ in linears) and any("lm_head" in n for n, _ in linears)


class PackedLinear(torch.nn.Linear):
    """A Linear whose ``weight`` is a packed uint8 column, like bitsandbytes' Linear4bit
    (a Params4bit of shape [bytes, 1]); forward unpacks it exactly. Code that reads
    weight.shape or weight.dtype of a Linear gets nonsense from it."""

    @classmethod
    def packing(cls, linear: torch.nn.Linear) -> "PackedLinear":
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.compute_dtype = linear.weight.dtype
        packed = linear.weight.detach().contiguous().view(torch.uint8).reshape(-1, 1)
        new.weight = torch.nn.Parameter(packed, requires_grad=False)
        new.bias = linear.bias
        return new

    def forward(self, x):
        w = self.weight.reshape(-1).view(self.compute_dtype).view(self.out_features, self.in_features)
        return F.linear(x, w, self.bias)


def _answer(model, frames, decode_mode="default"):
    state = extract_attention(model, frames, QUESTION, layer=2)
    pruned = prune_tokens(local_debias(global_debias(state)), 0.25)
    answer = generate_answer(pruned, SamplingConfig(max_new_tokens=6, ignore_eos=True, decode_mode=decode_mode))
    return state.scores, pruned.keep, answer.token_ids


def test_stages_never_read_linear_weights(tiny_dir, tiny, frames):
    packed = load_video_llm(tiny_dir, device="cpu", dtype="float32")
    layers = packed.adapter.text_model.layers
    swapped = 0
    for parent in layers.modules():
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, PackedLinear.packing(child))
                swapped += 1
    assert swapped == 7 * len(layers)  # q, k, v, o, gate, up, down per layer
    assert layers[0].self_attn.q_proj.weight.dtype == torch.uint8
    for mode in ("default", "static"):
        ref_scores, ref_keep, ref_tokens = _answer(tiny, frames, mode)
        scores, keep, tokens = _answer(packed, frames, mode)
        assert torch.equal(scores, ref_scores) and torch.equal(keep, ref_keep) and tokens == ref_tokens


def test_load_node_appends_the_choices_to_its_dtype_combo():
    from pack import pack_module

    node = pack_module("nodes.load_model").AdaTP_LoadVideoLLM
    choices = node.INPUT_TYPES()["required"]["dtype"][0]
    assert choices == ["auto", "float32", "float16", "bfloat16", "bnb-4bit", "bnb-8bit"]  # old order kept
