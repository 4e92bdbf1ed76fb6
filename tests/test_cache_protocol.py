"""The cache protocol, read from the installed transformers: every method and attribute that a
supported family's modeling code calls on its cache object must be there on every cache form the
pack hands to transformers' layers.

transformers adds such calls in minor releases (5.25: ``get_recurrent_states_to_keep`` and
``increase_count``; 5.17 reads ``has_previous_state`` and ``layers[i].conv_states``). This test
reads the modeling files of the release installed, so it fails on the day a release calls
something a form lacks, and names the form and the call.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from adatp_core.hf.cache import LINEAR_ATTENTION, KVCache, KVLayout, LinearLayout, LinearState, RowsKVCache
from adatp_core.models.loader import ADAPTERS

transformers = pytest.importorskip("transformers")

# A cache object in transformers' modeling code: ``past_key_values`` (<= 5.2x), ``cache`` (5.2x on),
# ``cache_params`` (the linear-attention layers of 5.17-5.24). Not ``self.cache`` or ``x.cache``.
_CACHE = r"(?<![\w.])(?:past_key_values|cache_params|cache)"
_CALL = re.compile(_CACHE + r"\.(\w+)")
_LAYER_ATTR = re.compile(_CACHE + r"\.layers\[[^\]]+\]\.(\w+)")

H, S, D = 2, 3, 4  # kv heads, positions, head size of the made-up attention layers
CONV, KERNEL, HV = 6, 4, 2  # conv channels, kernel, value heads of the made-up linear layers


def _configs(model_type: str):
    config = transformers.AutoConfig.for_model(model_type)
    return config, getattr(config, "text_config", config)


def _modeling_files(model_type: str) -> list[Path]:
    """The modeling files whose code runs with the pack's caches: the family's model class and its
    text model (LLaVA-OneVision's is Qwen2)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    _, text = _configs(model_type)
    classes = [getattr(transformers, ADAPTERS[model_type].model_class)]
    text_class = MODEL_MAPPING_NAMES.get(text.model_type)
    if text_class and hasattr(transformers, text_class):
        classes.append(getattr(transformers, text_class))
    return sorted({Path(inspect.getsourcefile(c)) for c in classes})


def cache_calls(model_type: str) -> tuple[set[str], set[str]]:
    """(names called or read on a cache object, names read on one of its ``layers[i]``) in the
    installed modeling files of ``model_type``."""
    calls, layer_attrs = set(), set()
    for path in _modeling_files(model_type):
        source = path.read_text()
        calls |= set(_CALL.findall(source))
        layer_attrs |= set(_LAYER_ATTR.findall(source))
    return calls, layer_attrs


def _kinds(model_type: str) -> tuple[str, ...]:
    _, text = _configs(model_type)
    kinds = getattr(text, "layer_types", None)
    return tuple(kinds) if kinds else ("full_attention",) * text.num_hidden_layers


def _past(kinds) -> tuple:
    out = []
    for kind in kinds:
        if kind == LINEAR_ATTENTION:
            out.append(LinearState(torch.randn(1, CONV, KERNEL), torch.randn(1, HV, D, D), S))
        else:
            out.append((torch.randn(1, H, S, D), torch.randn(1, H, S, D)))
    return tuple(out)


def cache_forms(kinds) -> dict:
    """Every form the pack hands to transformers' layers, for a model with these layer kinds."""
    past = _past(kinds)
    full = KVCache(len(kinds), past=past, reserve=2)
    first_attention = next((i for i, k in enumerate(kinds) if k != LINEAR_ATTENTION), 0)
    layouts = tuple(full.layout(i) for i in range(len(kinds)))
    bucket = RowsKVCache.allocated(layouts, (8,) * len(kinds), torch.device("cpu"))  # a kept static bucket
    bucket.add(full, 0)
    rows = RowsKVCache(len(kinds), slots=2)
    rows.add(full, 4)
    rows.add(KVCache(len(kinds), past=_past(kinds)), 4)
    host = [i for i, k in enumerate(kinds) if k != LINEAR_ATTENTION and i > first_attention]
    on_host = KVCache(kinds, past=_past(kinds), reserve=2, host=host)  # host-homed layers: the past written in
    return {
        "KVCache (a prefill)": KVCache(kinds),
        "KVCache (continued from layer K)": KVCache(kinds, past=past[:first_attention + 1]),
        "KVCache (continued from layer K, keys and values on the host)": KVCache(
            kinds, past=past[:first_attention + 1], host=host),
        "RowsWindow (one answer, keys and values on the host)": RowsKVCache.holding(on_host).window(0, 1),
        "KVCache (a whole past)": full,
        "RowsWindow (one answer)": RowsKVCache.holding(KVCache(len(kinds), past=_past(kinds), reserve=2)).window(0, 1),
        "RowsWindow (a static bucket)": bucket.window(0, 1, static=True),
        "RowsWindow": rows.window(0, 2),
        "RowsWindow (static)": rows.window(0, 2, static=True),
    }


def _reference_layer(kind: str):
    """transformers' own layer object for a layer of this kind."""
    from transformers.cache_utils import DynamicLayer, LinearAttentionLayer

    return LinearAttentionLayer() if kind == LINEAR_ATTENTION else DynamicLayer()


@pytest.mark.parametrize("model_type", sorted(ADAPTERS))
def test_every_cache_form_answers_every_call_the_installed_modeling_code_makes(model_type):
    calls, layer_attrs = cache_calls(model_type)
    # The scan must see the calls it exists for, or a change of wording would pass it silently.
    assert "update" in calls, f"no cache.update found in {_modeling_files(model_type)}"
    kinds = _kinds(model_type)
    if LINEAR_ATTENTION in kinds:
        assert "update_recurrent_state" in calls
    missing = []
    for form_name, form in cache_forms(kinds).items():
        missing += [f"{form_name} has no {name!r}" for name in sorted(calls) if not hasattr(form, name)]
        for i, kind in enumerate(kinds):
            reference = _reference_layer(kind)
            missing += [f"{form_name}.layers[{i}] ({kind}) has no {name!r}" for name in sorted(layer_attrs)
                        if hasattr(reference, name) and not hasattr(form.layers[i], name)]
    assert not missing, (f"transformers {transformers.__version__}'s {model_type} code calls what the pack's "
                         "caches lack:\n" + "\n".join(missing))


def test_the_scan_reads_the_calls_of_each_release():
    """What the regexes take from code in the styles of 5.17, 5.24 and 5.25."""
    source = """
        use = cache_params is not None and cache_params.has_previous_state(self.layer_idx, state_idx=0)
        conv_state = cache_params.layers[self.layer_idx].conv_states[0]
        n = cache.get_recurrent_states_to_keep(self.layer_idx) if cache is not None else 0
        cache.increase_count(layer_idx, state_idx)
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        self.cache.not_a_cache_call()
    """
    assert set(_CALL.findall(source)) == {"has_previous_state", "layers", "get_recurrent_states_to_keep",
                                          "increase_count", "update"}
    assert _LAYER_ATTR.findall(source) == ["conv_states"]


def _conv(cache, layer_idx: int = 0):
    """Layer ``layer_idx``'s conv state as the installed release reads it: ``get_conv_state``
    (5.2x), ``layers[i].conv_states[0]`` (5.17)."""
    if hasattr(cache, "get_conv_state"):
        return cache.get_conv_state(layer_idx)
    return cache.layers[layer_idx].conv_states[0] if cache.has_previous_state(layer_idx) else None


def _recurrent(cache, layer_idx: int = 0):
    if hasattr(cache, "get_recurrent_state"):
        return cache.get_recurrent_state(layer_idx)
    return cache.layers[layer_idx].recurrent_states[0] if cache.has_previous_state(layer_idx) else None


def test_the_fixed_buffers_are_what_transformers_reads_and_writes():
    """Static and batched-row forms hold the pack's own buffers in transformers' layer objects:
    transformers' accessors must hand back those very buffers, as state with a past, so that a
    decode step updates them in place (a captured graph replays on them)."""
    kinds = (LINEAR_ATTENTION, "full_attention")
    forms = cache_forms(kinds)
    for name in ("RowsWindow (one answer)", "RowsWindow (a static bucket)"):
        one = forms[name]
        assert one.has_previous_state(0), name
        assert _conv(one).data_ptr() == one.cache.linear[0][0].data_ptr(), name
        assert _recurrent(one).data_ptr() == one.cache.linear[0][1].data_ptr(), name
    window = forms["RowsWindow"]
    conv, recurrent = window.cache.linear[0]
    assert window.has_previous_state(0)
    assert _conv(window).data_ptr() == conv.data_ptr()
    assert _recurrent(window).data_ptr() == recurrent.data_ptr()
    assert torch.equal(_conv(window), conv[:2])
    # A new state goes into the same buffer, in place.
    window.update_recurrent_state(torch.full_like(recurrent[:2], 7.0), 0)
    assert (recurrent[:2] == 7).all()


def test_a_layout_names_what_fixed_buffers_hold_and_allocates_them():
    """Each layer's layout is a named, hashable value (part of a static bucket's key): its kind and
    its fields, read from the cache that fills it. Buffers allocated from it have the layer's shapes
    and dtypes, with the capacity only where a layer grows (attention), and take the past."""
    past = (LinearState(torch.randn(1, CONV, KERNEL, dtype=torch.float16), torch.randn(1, HV, D, D), S),
            (torch.randn(1, H, S, D, dtype=torch.bfloat16), torch.randn(1, H, S, D, dtype=torch.bfloat16)))
    full = KVCache((LINEAR_ATTENTION, "full_attention"), past=past)
    layouts = tuple(full.layout(i) for i in range(2))
    assert layouts == (LinearLayout((CONV, KERNEL), torch.float16, (HV, D, D), torch.float32),
                       KVLayout(heads=H, head_dim=D, dtype=torch.bfloat16))
    assert layouts == tuple(KVCache((LINEAR_ATTENTION, "full_attention"), past=past).layout(i) for i in range(2))
    assert len({layouts, tuple(full.layout(i) for i in range(2))}) == 1  # hashable, equal by value
    assert KVLayout(H, D, torch.float16) != KVLayout(H, D, torch.bfloat16)
    rows = RowsKVCache.allocated(layouts, (0, 16), torch.device("cpu"), slots=3)
    conv, recurrent = rows.linear[0]
    assert (conv.shape, conv.dtype, recurrent.shape, recurrent.dtype) == (
        (3, CONV, KERNEL), torch.float16, (3, HV, D, D), torch.float32)
    assert rows.keys[1].shape == rows.values[1].shape == (3, H, 16, D) and rows.keys[1].dtype == torch.bfloat16
    assert rows.attention_layers() == [1] and not any(b.any() for b in (conv, recurrent, rows.keys[1]))
    rows.add(full, 0)
    assert torch.equal(rows.linear[0][0][0], past[0].conv[0]) and torch.equal(rows.keys[1][0, :, :S], past[1][0][0])


def test_a_prefill_starts_without_a_past_and_continues_with_one():
    """A linear layer with no past says so the way transformers asks (None, has_previous_state
    False), then holds the prefill's state and counts its tokens; the next call continues it."""
    cache = KVCache((LINEAR_ATTENTION,))
    assert _conv(cache) is None and _recurrent(cache) is None
    assert not cache.has_previous_state(0)
    x = torch.randn(1, CONV, 5)
    full = cache.update_conv_state(x, 0, conv_kernel_size=KERNEL)
    assert torch.equal(full, x)
    cache.update_recurrent_state(torch.randn(1, HV, D, D), 0)
    assert cache.has_previous_state(0) and cache.lengths() == (5,)
    assert torch.equal(_conv(cache), x[..., -KERNEL:])
    y = torch.randn(1, CONV, 2)
    full = cache.update_conv_state(y, 0, conv_kernel_size=KERNEL)
    assert torch.equal(full, torch.cat([x[..., -KERNEL:], y], dim=-1))  # the past, then the new tokens
    cache.update_recurrent_state(torch.randn(1, HV, D, D), 0)
    assert cache.lengths() == (7,)


@pytest.mark.parametrize("with_increase_count", [False, True])
def test_a_decode_step_counts_one_token_in_either_protocol(with_increase_count):
    """5.17-5.24 update the conv state in place and call nothing but update_recurrent_state; 5.25
    calls increase_count first. Either way the layer has taken in one more token."""
    from transformers.cache_utils import Cache

    if with_increase_count and not hasattr(Cache, "increase_count"):
        pytest.skip(f"transformers {transformers.__version__} has no increase_count (5.25 added it)")
    cache = KVCache(2, past=_past((LINEAR_ATTENTION, "full_attention")))
    if with_increase_count:
        cache.increase_count(0, 0)
    cache.update_recurrent_state(torch.randn(1, HV, D, D), 0)
    cache.update(torch.randn(1, H, 1, D), torch.randn(1, H, 1, D), 1)
    assert cache.lengths() == (S + 1, S + 1)


def test_a_grown_attention_layer_survives_what_transformers_does_to_its_keys():
    """KVLayer writes in place into a buffer with room; a crop keeps writing there, and a
    reorder (which replaces keys) moves it to a new buffer rather than writing into a stale one."""
    cache = KVCache(1, reserve=4)
    k = torch.arange(3.0).view(1, 1, 3, 1)
    cache.update(k, k, 0)
    keys, _ = cache.update(k[..., :1, :] + 10, k[..., :1, :] + 10, 0)
    assert keys.flatten().tolist() == [0, 1, 2, 10]
    cache.crop(-1)
    keys, _ = cache.update(k[..., :1, :] + 20, k[..., :1, :] + 20, 0)
    assert keys.flatten().tolist() == [0, 1, 2, 20] and cache.lengths() == (4,)
    cache.reorder_cache(torch.tensor([0]))
    before = cache.layers[0].keys.clone()
    keys, _ = cache.update(k[..., :1, :] + 30, k[..., :1, :] + 30, 0)
    assert keys.flatten().tolist() == [*before.flatten().tolist(), 30]


def test_every_form_says_how_many_tokens_it_holds():
    """get_seq_length, which transformers asks of a cache (and a release may start asking of any
    form), is the longest row's count before the step, static or not, for both kinds of layer; where
    the release keeps its own count of a linear layer (5.25's cumulative_length_linear), it agrees."""
    kinds = (LINEAR_ATTENTION, "full_attention")
    forms = cache_forms(kinds)
    rows = forms["RowsWindow"].cache
    assert [r for r in rows.lengths] == [[S, S], [S, S]]
    for name in ("KVCache (a whole past)", "RowsWindow (one answer)", "RowsWindow (a static bucket)", "RowsWindow",
                 "RowsWindow (static)"):
        form = forms[name]
        assert [form.get_seq_length(i) for i in range(len(kinds))] == [S, S], name
        count = getattr(form.layers[0], "cumulative_length_linear", None)
        assert count is None or int(count) == S, (name, count)
