"""A model split over several devices: every layer gets its inputs, cache and
indices on its own device, found from the layer's weights, never from model.device.

A CPU-only machine has one real device. The second one here is "meta" (tensors
with shapes but no data): a layer placed there fails loudly when handed a CPU
tensor, and a pre-hook on every layer checks each tensor it receives.
"""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTION

from adatp_core.attention import extract_attention
from adatp_core.debias import global_debias, local_debias
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.models.base import KVCache, module_device
from adatp_core.models.loader import load_video_llm
from adatp_core.prune import prune_tokens


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _check_inputs_on_own_device(module, args, kwargs):
    dev = module_device(module)
    wrong = [tuple(t.shape) for t in _tensors((args, kwargs)) if t.device != dev]
    assert not wrong, f"{type(module).__name__} on {dev} got tensors {wrong} from another device"


@pytest.fixture
def split(tiny_dir):
    """The tiny model with decoder layers 2.. , the final norm and lm_head on a second device."""
    llm = load_video_llm(tiny_dir, device="cpu", dtype="float32")
    tm = llm.adapter.text_model
    for module in (*tm.layers[2:], tm.norm, llm.model.lm_head):
        module.to("meta")
    hooks = [m.register_forward_pre_hook(_check_inputs_on_own_device, with_kwargs=True)
             for m in (*tm.layers, tm.norm, llm.model.lm_head)]
    yield llm
    for h in hooks:
        h.remove()


def test_device_lookups_follow_each_layer(split):
    adapter = split.adapter
    devices = [module_device(layer).type for layer in adapter.text_model.layers]
    assert devices == ["cpu", "cpu", "meta", "meta"]
    assert adapter.device.type == "cpu" and adapter.output_device.type == "meta" and adapter.is_split


def test_layers_receive_hidden_states_and_fill_caches_on_their_device(split, frames):
    adapter = split.adapter
    state = extract_attention(split, frames, QUESTION, layer=2)  # layers 0, 1: the CPU part
    assert state.scores.device.type == "cpu" and torch.isfinite(state.scores).all()
    pruned = prune_tokens(local_debias(global_debias(state)), 0.25)
    positions = pruned.kept_positions()
    hidden = state.hidden[:, positions]
    cache = KVCache(adapter.num_layers, past=state.past_kv, reserve=4)
    out = adapter.run_layers(hidden, state.position_ids[..., positions], cache, 2, adapter.num_layers)
    assert out.device.type == "meta" and out.shape == hidden.shape
    assert [cache.layer(i)[0].device.type for i in range(adapter.num_layers)] == ["cpu", "cpu", "meta", "meta"]
    assert cache.lengths() == (state.prompt.length,) * 2 + (positions.numel(),) * 2
    logits = adapter.logits(out[:, -1:])
    assert logits.device.type == "meta" and logits.shape == (1, split.model.config.text_config.vocab_size)
    # a decode step: the token enters on the input device and crosses over again
    step = adapter.run_layers(adapter.embed_tokens(torch.tensor([[5]])),
                              adapter.next_position_ids(state.position_ids, 0), cache, 0, adapter.num_layers)
    assert step.device.type == "meta" and cache.lengths()[0] == state.prompt.length + 1


def _answer(model, frames, decode_mode):
    state = extract_attention(model, frames, QUESTION, layer=2)
    pruned = prune_tokens(local_debias(global_debias(state)), 0.25)
    answer = generate_answer(pruned, SamplingConfig(max_new_tokens=6, ignore_eos=True, decode_mode=decode_mode))
    return state.scores, pruned.keep, answer.token_ids


@pytest.mark.filterwarnings("ignore:The following device_map keys do not match")  # a parameter, not a module
def test_accelerate_dispatched_model_answers_exactly(tiny_dir, tiny, frames, tmp_path):
    """accelerate's dispatch (what from_pretrained(device_map=...) does): layers 2.. keep their
    weights on disk and run on the CPU through accelerate's hooks. The answer is the same."""
    from accelerate import dispatch_model

    llm = load_video_llm(tiny_dir, device="cpu", dtype="float32")
    tm = llm.adapter.text_model
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.image_newline": "cpu",
                  "model.language_model.embed_tokens": "cpu", "model.language_model.rotary_emb": "cpu",
                  "model.language_model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.language_model.layers.{i}": "cpu" if i < 2 else "disk" for i in range(len(tm.layers))})
    dispatch_model(llm.model, device_map, main_device="cpu", offload_dir=str(tmp_path))
    assert tm.layers[3].self_attn.q_proj.weight.device.type == "meta"  # the weights wait on disk
    assert module_device(tm.layers[3]).type == "cpu" and not llm.adapter.is_split
    for mode in ("default", "static"):
        scores, keep, tokens = _answer(llm, frames, mode)
        ref_scores, ref_keep, ref_tokens = _answer(tiny, frames, mode)
        assert torch.equal(scores, ref_scores) and torch.equal(keep, ref_keep) and tokens == ref_tokens
