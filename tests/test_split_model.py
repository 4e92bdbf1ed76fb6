"""A model split over several devices: every layer gets its inputs, cache and
indices on its own device, found from the layer's weights, never from model.device.

A CPU-only machine has one real device. The second one here is "meta" (tensors
with shapes but no data): a layer placed there fails loudly when handed a CPU
tensor, and a pre-hook on every layer checks each tensor it receives.
"""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTION, LoaderStopped

from adatp_core.attention import extract_attention
from adatp_core.debias import global_debias, local_debias
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.decode import continue_prefill, row_positions
from adatp_core.steps import decode_step
from adatp_core.hf.cache import KVCache, RowsKVCache
from adatp_core.hf.layers import module_device
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
    cache = KVCache(adapter.layer_kinds, past=state.past_kv, reserve=4)
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


def test_rows_decoded_together_index_and_mask_each_layer_on_its_device(split, frames):
    """Captions decoded together on a split model (batched auto is the default there): every
    attention layer's write index and mask come from the rows' lengths, which must be on that
    layer's device, not the first layer's; the pre-hook fails a mask from the CPU on the meta layers."""
    adapter = split.adapter
    state = prune_tokens(local_debias(global_debias(extract_attention(split, frames, QUESTION, layer=2))), 0.25)
    rows = RowsKVCache(adapter.num_layers, 3)
    for _ in range(2):
        cache, logits = continue_prefill(state, 0)
        rows.add(cache, 4)
    assert [rows.keys[i].device.type for i in range(adapter.num_layers)] == ["cpu", "cpu", "meta", "meta"]
    first = int(state.position_ids.max()) + 1
    for step in range(2):  # the lengths per device are current at every step
        window = rows.window(0, 2)
        masks = window.masks()
        assert [m.device.type for m in masks] == ["cpu", "cpu", "meta", "meta"]
        positions = row_positions([first] * 2, [step] * 2, state.position_ids, adapter.device)
        out = decode_step(adapter, torch.tensor([5, 6]), positions, window, masks)
        assert out.device.type == "meta" and out.shape == (2, logits.shape[-1])
        rows.advance(0, 2)
    assert rows.lengths == [[state.prompt.length + 2] * 2 + [state.kept_positions().numel() + 2] * 2] * 2


def _answer(model, frames, decode_mode):
    state = extract_attention(model, frames, QUESTION, layer=2)
    pruned = prune_tokens(local_debias(global_debias(state)), 0.25)
    answer = generate_answer(pruned, SamplingConfig(max_new_tokens=6, ignore_eos=True, decode_mode=decode_mode))
    return state.scores, pruned.keep, answer.token_ids


def _tiny_map(tiny_dir, gpu_bytes, quantization=None):
    """The loader's balanced map of the tiny model over two GPUs of ``gpu_bytes`` each (no GPU needed:
    accelerate plans from shapes on the meta device)."""
    import transformers

    from adatp_core.models.llava_onevision import LlavaOnevisionAdapter
    from adatp_core.models.placement import split_device_map

    config = transformers.AutoConfig.from_pretrained(tiny_dir)
    return split_device_map(transformers.LlavaOnevisionForConditionalGeneration, config, torch.float32,
                            LlavaOnevisionAdapter.input_modules, max_memory={0: gpu_bytes, 1: gpu_bytes, "cpu": 0},
                            quantization=quantization)


def _model_bytes(llm):
    return sum(t.numel() * t.element_size() for t in llm.model.state_dict().values())


def test_balanced_map_splits_layers_and_keeps_the_vision_side_whole(tiny_dir, tiny):
    device_map = _tiny_map(tiny_dir, int(_model_bytes(tiny) * 0.7))
    layer_keys = [k for k in device_map if k.startswith("model.language_model.layers.")]
    assert {device_map[k] for k in layer_keys} == {0, 1}  # the decoder layers are spread
    assert all(k.count(".") == 3 for k in layer_keys)  # whole layers: never split inside one
    for name in ("model.vision_tower", "model.multi_modal_projector", "model.image_newline",
                 "model.language_model.embed_tokens"):
        assert device_map[name] == 0, name  # pinned together on the first GPU, unsplit
    assert not any(k.startswith("model.vision_tower.") for k in device_map)
    assert set(device_map.values()) <= {0, 1}


def test_a_model_too_large_for_the_gpus_is_refused(tiny_dir, tiny):
    from adatp_core.errors import AdaTPEnvironmentError

    with pytest.raises(AdaTPEnvironmentError, match="does not fit.*bnb-4bit"):
        _tiny_map(tiny_dir, int(_model_bytes(tiny) * 0.3))


def test_multi_gpu_is_refused_without_a_gpu(tiny_dir, monkeypatch):
    from adatp_core.errors import AdaTPEnvironmentError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AdaTPEnvironmentError, match="multi-gpu.*none is available"):
        load_video_llm(tiny_dir, device="multi-gpu")


@pytest.mark.filterwarnings("ignore:The following device_map keys do not match")  # a parameter, not a module
def test_the_balanced_map_dispatched_answers_exactly(tiny_dir, tiny, frames, tmp_path):
    """The loader's map for two GPUs, with the first GPU played by the CPU and the second by the
    disk: accelerate's hooks (as from_pretrained(device_map=...) installs them) run those layers on
    the CPU with weights read from disk. The answer is exactly the plain model's."""
    from accelerate import dispatch_model

    device_map = _tiny_map(tiny_dir, int(_model_bytes(tiny) * 0.7))
    llm = load_video_llm(tiny_dir, device="cpu", dtype="float32")
    dispatch_model(llm.model, {k: "cpu" if v == 0 else "disk" for k, v in device_map.items()},
                   main_device="cpu", offload_dir=str(tmp_path))
    tm = llm.adapter.text_model
    offloaded = [i for i, layer in enumerate(tm.layers) if layer.self_attn.q_proj.weight.device.type == "meta"]
    assert 0 < len(offloaded) < len(tm.layers)  # some layers' weights wait on disk
    assert all(module_device(tm.layers[i]).type == "cpu" for i in offloaded)  # accelerate's execution device
    for mode in ("default", "static"):
        scores, keep, tokens = _answer(llm, frames, mode)
        ref_scores, ref_keep, ref_tokens = _answer(tiny, frames, mode)
        assert torch.equal(scores, ref_scores) and torch.equal(keep, ref_keep) and tokens == ref_tokens


def test_loader_hands_the_split_map_to_transformers(tiny_dir, tiny, fake_cuda, stop_at_from_pretrained,
                                                    monkeypatch):
    from adatp_core.models import loader

    planned = _tiny_map(tiny_dir, int(_model_bytes(tiny) * 0.7))
    monkeypatch.setattr(loader, "split_device_map", lambda *a, **k: planned)  # free memory cannot be measured here
    with pytest.raises(LoaderStopped):
        load_video_llm(tiny_dir, device="multi-gpu", offload_device="cpu")
    seen = stop_at_from_pretrained
    assert seen["device_map"] == planned and seen["dtype"] == torch.bfloat16


def test_load_node_appends_multi_gpu_to_its_device_combo():
    from pack import pack_module

    node = pack_module("nodes.load_model").AdaTP_LoadVideoLLM
    assert node.INPUT_TYPES()["required"]["device"][0] == ["auto", "cuda", "cpu", "multi-gpu"]  # old order kept
