"""Qwen3.5 / Qwen3.6 (hybrid: Gated DeltaNet linear attention + full attention) and the MoE
models (Qwen3.5-MoE, Qwen3-VL-MoE) on their tiny built-ins, float32, CPU. Issue 21's exactness:
- R = 1 equals stock generate() (tokens; logits within 1e-5) at every valid K;
- random keep sets equal transformers' own layers >= K run on the kept subsequence
  (reference.subsequence_logits) over the prefill and 8 decode steps, within 1e-5;
- layer K-1's scores equal eager attention probabilities within 1e-5;
and the hybrid rules: which K runs, where the scores come from, what each layer remembers,
a reused prefix, and the template's thinking switch."""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTION
from hybrid_fixtures import *  # noqa: F401,F403  (family, tiny, stock, stock_eager, frames)
from reference import stock_video_kwargs, subsequence_reference

from adatp_core.attention import extract_attention
from adatp_core.hf.cache import LinearState
from adatp_core.errors import AdaTPInputError
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.prune import prune_tokens

TOL = 1e-5
STEPS = 8


def _hybrid(tiny) -> bool:
    return any(tiny.adapter.is_linear_layer(i) for i in range(tiny.adapter.num_layers))


def test_the_layer_kinds_come_from_the_config(tiny):
    """Qwen3.5's tiny model: linear attention except layers 3, 5 and 7 (not the every-4th
    pattern, so nothing may assume it); the Qwen3-VL MoE has full attention everywhere."""
    adapter = tiny.adapter
    kinds = getattr(adapter.text_model.config, "layer_types", None) or ("full_attention",) * adapter.num_layers
    assert adapter.layer_kinds == tuple(kinds)
    if _hybrid(tiny):
        assert [i for i, k in enumerate(kinds) if k == "full_attention"] == [3, 5, 7]
        assert adapter.valid_layers() == (0, 4, 6)
        assert adapter.default_layer() == 4
    else:
        assert adapter.valid_layers() == tuple(range(adapter.num_layers))
        assert adapter.default_layer() == 2


def test_retention_one_is_stock_generate_at_every_valid_k(tiny, stock, frames):
    for layer in tiny.adapter.valid_layers():
        state = prune_tokens(extract_attention(tiny, frames, QUESTION, layer=layer), retention=1.0)
        assert state.layer == layer and state.keep.numel() == state.num_visual
        ours = generate_answer(state, SamplingConfig(max_new_tokens=STEPS), return_logits=True)
        ids = state.prompt.input_ids[None]
        with torch.inference_mode():
            out = stock.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 **stock_video_kwargs(tiny, state.prompt, frames), max_new_tokens=STEPS,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
        eos = set(tiny.adapter.eos_token_ids)
        stock_tokens = [t for t in out.sequences[0, ids.shape[1]:].tolist() if t not in eos]
        assert list(ours.token_ids) == stock_tokens
        assert len(set(stock_tokens)) > 1, "the tiny model repeats one token: the test would prove little"
        err = (ours.logits - torch.cat(out.logits).float()[: ours.logits.shape[0]]).abs().max().item()
        print(f"{tiny.model.config.model_type} K={layer}: max logit error vs stock generate() {err:.3g}")
        assert err < TOL


def test_random_keep_sets_match_the_kept_subsequence_reference(tiny, stock, frames):
    """At every valid K (K = 0 included), a random keep set of its own: the prefill and 8 decode
    steps against transformers' own layers >= K run on the kept subsequence (the linear layers'
    convolution and recurrence over the kept tokens only, in order)."""
    seed = 0
    for layer in tiny.adapter.valid_layers():
        state = extract_attention(tiny, frames, QUESTION, layer=layer)
        gen = torch.Generator().manual_seed(seed * 100 + layer)
        n_keep = int(torch.randint(1, state.num_visual, (1,), generator=gen))
        keep = torch.sort(torch.randperm(state.num_visual, generator=gen)[:n_keep]).values
        ours = generate_answer(state.evolve(keep=keep), SamplingConfig(max_new_tokens=STEPS + 1, ignore_eos=True),
                               return_logits=True)
        assert ours.logits.shape[0] == STEPS + 1  # the prefill's token and 8 decode steps
        ref = subsequence_reference(stock, tiny, state, frames, ours.token_ids, keep)
        err = (ours.logits - ref).abs().max().item()
        print(f"{tiny.model.config.model_type} K={layer} seed={seed} kept {n_keep}/{state.num_visual}: "
              f"max logit error vs the kept-subsequence reference {err:.3g}")
        assert err < TOL
        full = subsequence_reference(stock, tiny, state, frames, ours.token_ids, torch.arange(state.num_visual))
        assert (full[0] - ours.logits[0]).abs().max().item() > 1e-3, "pruning changed nothing"


def test_scores_match_eager_attention_at_every_valid_k(tiny, stock_eager, frames):
    """transformers records attention probabilities for its full-attention layers only."""
    full_layers = [i for i in range(tiny.adapter.num_layers) if not tiny.adapter.is_linear_layer(i)]
    for query in ("text", "last"):
        state = extract_attention(tiny, frames, QUESTION, layer=tiny.adapter.valid_layers()[1], query=query)
        ids = state.prompt.input_ids[None]
        with torch.inference_mode():
            out = stock_eager(input_ids=ids, attention_mask=torch.ones_like(ids),
                              **stock_video_kwargs(tiny, state.prompt, frames), output_attentions=True)
        assert len(out.attentions) == len(full_layers)
        for layer in tiny.adapter.valid_layers()[1:]:
            s = extract_attention(tiny, frames, QUESTION, layer=layer, query=query)
            probs = out.attentions[full_layers.index(layer - 1)][0]  # [H, L, L] at layer K-1
            rows = slice(s.prompt.after_video, None) if query == "text" else slice(-1, None)
            expected = probs[:, rows][:, :, s.prompt.visual_positions].mean(dim=(0, 1))
            assert (s.scores - expected).abs().max().item() < TOL
            assert s.scores.std() > 0
            assert s.stats["score_layer"] == f"layer {layer - 1} (full attention)"


def test_a_k_on_a_linear_layer_moves_up_and_the_stats_say_so(tiny, frames):
    if not _hybrid(tiny):
        pytest.skip("every layer of this model has attention scores")
    moved = extract_attention(tiny, frames, QUESTION, layer=2)  # a shared workflow's default K
    assert moved.layer == 4
    assert moved.stats["layer"] == 4 and moved.stats["layer_asked"] == 2
    assert "K=2 moved to K=4" in moved.stats["layer_moved"] and "layer 1 is linear attention" in moved.stats["layer_moved"]
    assert moved.stats["score_layer"] == "layer 3 (full attention)"
    assert moved.stats["layers_valid"] == "0, 4, 6" and moved.stats["layer_default"] == 4
    from adatp_core.report import stats_text

    text = stats_text(moved.stats)  # what the node's stats output shows
    assert "K=4, scores from layer 3 (full attention)" in text
    assert "Layer: K=2 moved to K=4" in text and "Valid K here: 0, 4, 6." in text
    assert "Linear-attention layers run: gated delta rule: PyTorch" in text
    assert extract_attention(tiny, frames, QUESTION, layer=5).layer == 6
    same = extract_attention(tiny, frames, QUESTION, layer=4)
    assert same.layer == 4 and "layer_moved" not in same.stats
    assert torch.equal(same.scores, moved.scores)
    zero = extract_attention(tiny, frames, QUESTION, layer=0)
    assert zero.layer == 0 and zero.stats["score_layer"].startswith("text relevance")
    with pytest.raises(AdaTPInputError, match=r"K=7 .*Choose K from 0, 4, 6"):
        extract_attention(tiny, frames, QUESTION, layer=7)


def test_the_stats_text_says_that_k_moved(tiny, frames):
    """The nodes' stats output (Prune Tokens, Generate Answer) and the CLI print stats_text: a
    shared workflow's K = 2 on Qwen3.5 shows K=4 and why, not a bare K=4."""
    from adatp_core.report import stats_text

    state = prune_tokens(extract_attention(tiny, frames, QUESTION, layer=2), retention=0.5)
    answer = generate_answer(state, SamplingConfig(max_new_tokens=1))
    for text in (stats_text(state.stats), stats_text(answer.stats)):
        if _hybrid(tiny):
            assert "K=4, scores from layer 3 (full attention)" in text and "Layer: K=2 moved to K=4" in text
        else:
            assert "K=2, scores from layer 1 (full attention)" in text and "moved" not in text


def test_captioning_a_folder_says_once_that_k_moved(tiny, caplog):
    """Caption Folder / `caption --layer 2` on Qwen3.5 runs K = 4: the run says so before the
    first clip (it was silent; only each clip's stats dict knew)."""
    import logging

    from adatp_core.caption import caption_videos
    from adatp_core.pipeline import PipelineConfig

    with caplog.at_level(logging.WARNING, logger="adatp_core.caption"):
        assert list(caption_videos(tiny, [], "Describe the video.", PipelineConfig(layer=2), workers=0)) == []
    said = [r.getMessage() for r in caplog.records if r.name == "adatp_core.caption"]
    assert said == (["layer: " + tiny.adapter.resolve_layer(2)[1]] if _hybrid(tiny) else [])
    if _hybrid(tiny):
        assert "K=2 moved to K=4" in said[0]


def test_a_k_out_of_range_names_the_ks_this_model_takes(tiny):
    """K = 8 on the 8-layer hybrid: the error lists 0, 4, 6, not "0 to 7, 2 is the default"
    (K = 2 and 7 are not what runs there)."""
    adapter = tiny.adapter
    for layer in (adapter.num_layers, 100, -1):
        with pytest.raises(AdaTPInputError, match=f"outside this model's {adapter.num_layers} decoder layers") as err:
            adapter.resolve_layer(layer)
        if _hybrid(tiny):
            assert "choose K from 0, 4, 6" in str(err.value) and "2 is the default" not in str(err.value)
        else:
            assert f"between 0 (prune before the LLM) and {adapter.num_layers - 1} (2 is" in str(err.value)


def test_each_layer_remembers_the_full_prompt_below_k_and_the_kept_tokens_from_k(tiny, frames):
    """The spec's cache layout holds for both kinds of layer: a linear layer below K has folded
    in the whole prompt, one from K on only the kept tokens (kv_lengths counts both)."""
    layer = tiny.adapter.default_layer()
    state = extract_attention(tiny, frames, QUESTION, layer=layer)
    assert len(state.past_kv) == layer
    for i, entry in enumerate(state.past_kv):
        if tiny.adapter.is_linear_layer(i):
            assert isinstance(entry, LinearState) and entry.length == state.prompt.length
            assert entry.conv.shape[-1] == tiny.adapter.text_model.config.linear_conv_kernel_dim
        else:
            assert entry[0].shape[-2] == state.prompt.length
    pruned = prune_tokens(state, 0.25)
    for mode in ("default", "static"):
        answer = generate_answer(pruned, SamplingConfig(max_new_tokens=4, ignore_eos=True, decode_mode=mode))
        fed = answer.stats["new_tokens"] - 1  # the last token is never fed back
        full = state.prompt.length + fed
        kept = state.prompt.length - state.num_visual + pruned.keep.numel() + fed
        assert answer.stats["kv_lengths"] == (full,) * layer + (kept,) * (tiny.adapter.num_layers - layer)


def test_a_reused_prefix_gives_what_one_pass_gives(tiny, frames):
    """The second question about the same frames reuses the first one's prefix. With linear
    layers the prefix ends on a chunk boundary of the gated delta rule (64 tokens), so the
    recurrent state folds the same chunks as one pass."""
    tiny.prefix_cache.clear()
    layer = tiny.adapter.default_layer()
    for i, question in enumerate((QUESTION, "Why?", "Describe every object in this clip, in order.")):
        cached = extract_attention(tiny, frames, question, layer=layer)
        one_pass = extract_attention(tiny, frames, question, layer=layer, reuse_prefix=False)
        assert cached.stats["prefix_cache"] == ("miss" if i == 0 else "hit")
        p = cached.stats["prefix_tokens"]
        assert p <= cached.prompt.after_video
        if _hybrid(tiny):
            assert p % 64 == 0 and p > 0
        assert (cached.scores - one_pass.scores).abs().max().item() < 1e-6
        a = generate_answer(prune_tokens(cached, 0.25), SamplingConfig(max_new_tokens=6, ignore_eos=True),
                            return_logits=True)
        b = generate_answer(prune_tokens(one_pass, 0.25), SamplingConfig(max_new_tokens=6, ignore_eos=True),
                            return_logits=True)
        assert a.token_ids == b.token_ids
        assert (a.logits - b.logits).abs().max().item() < TOL


def test_prompts_switch_thinking_off_through_the_template(tiny):
    """Qwen3.5's template thinks unless enable_thinking is false; then the assistant's turn starts
    with an empty, closed thinking block, and the answer is what follows it."""
    if tiny.model.config.model_type == "qwen3_vl_moe":
        pytest.skip("Qwen3-VL's instruct template has no thinking block")
    tok = tiny.tokenizer
    prompt = tiny.adapter.build_prompt("Why?", tiny.adapter.plan_video(4, 64, 64))
    text = tok.decode(prompt.input_ids[prompt.question[1]:].tolist())
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n"), text
    default = tok.apply_chat_template([{"role": "user", "content": "Why?"}], chat_template=tiny.adapter.chat_template,
                                      tokenize=False, add_generation_prompt=True)
    assert default.endswith("<think>\n") and "</think>" not in default  # the test's teeth


def test_moe_quantization_keeps_routers_in_16_bits(tiny):
    """4/8-bit loading skips the routers and the shared experts' gates (transformers' skip rule:
    a suffix), but not the shared experts' projections."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    if "moe" not in tiny.model.config.model_type:
        pytest.skip("no experts")
    skip = list(tiny.adapter.unquantized_modules)
    names = [n for n, _ in tiny.model.named_modules()]
    routers = [n for n in names if n.endswith(".mlp.gate")]
    assert routers and not any(should_convert_module(n, skip) for n in routers)
    assert not should_convert_module("model.visual.blocks.0.mlp.linear_fc1", skip)
    gates = [n for n in names if n.endswith("shared_expert_gate")]
    assert not any(should_convert_module(n, skip) for n in gates)
    projections = [n for n in names if ".shared_expert.gate_proj" in n or ".self_attn.q_proj" in n]
    assert projections and all(should_convert_module(n, skip) for n in projections)


def test_multi_gpu_placement_splits_by_whole_layers(tiny_dir, tiny):
    """accelerate's balanced map of the model over two GPUs (planned from shapes on the meta
    device): decoder layers spread, none split inside (a linear layer's conv and projections,
    an MoE layer's experts stay with their layer), the vision side whole on the first GPU."""
    import transformers

    from adatp_core.models.placement import split_device_map

    adapter_cls = type(tiny.adapter)
    size = sum(t.numel() * t.element_size() for t in tiny.model.state_dict().values())
    config = transformers.AutoConfig.from_pretrained(tiny_dir)
    budget = int(size * 0.7)
    device_map = split_device_map(getattr(transformers, adapter_cls.model_class), config, torch.float32,
                                  adapter_cls.input_modules, max_memory={0: budget, 1: budget, "cpu": 0})
    layers = [k for k in device_map if k.startswith("model.language_model.layers")]
    assert layers and all(k.count(".") == 3 or k == "model.language_model.layers" for k in layers)
    assert set(device_map.values()) == {0, 1}  # (the tiny Qwen3-VL-MoE's layers all fit beside the tower)
    assert device_map["model.visual"] == 0 and device_map["model.language_model.embed_tokens"] == 0


def test_the_template_trims_the_question_as_the_real_one_does(tiny):
    """Qwen3.5's template trims the user's content, so trailing whitespace never reaches the model."""
    if tiny.model.config.model_type == "qwen3_vl_moe":
        pytest.skip("Qwen3-VL's template does not trim")
    plan = tiny.adapter.plan_video(4, 64, 64)
    padded, plain = (tiny.adapter.build_prompt(q, plan) for q in ("Why? \n ", "Why?"))
    assert torch.equal(padded.input_ids, plain.input_ids) and padded.question == plain.question
    assert not tiny.adapter.always_thinks


def test_a_template_that_always_thinks_is_named_in_the_stats(tiny_dir, tmp_path, frames):
    """A "-Thinking" template opens <think> whatever enable_thinking says: nothing is cut out of
    the answer, and the stats say why it starts with thinking."""
    import shutil

    from adatp_core.models.loader import load_video_llm

    folder = tmp_path / "thinking"
    shutil.copytree(tiny_dir, folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    (folder / "chat_template.jinja").write_text(
        "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}"
        "{%- for item in message.content %}{%- if item.type == 'video' %}"
        "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}{%- else %}{{- item.text }}{%- endif %}{%- endfor %}"
        "{{- '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}"
        "{%- endif %}")
    model = load_video_llm(folder, device="cpu", dtype="float32")
    assert model.adapter.always_thinks
    state = extract_attention(model, frames, QUESTION, layer=0)
    assert "always opens a thinking block" in state.stats["thinking"]


class _ReplayedStep:
    """A CUDA graph as the CPU can play it: the capture records ``fn`` without running it,
    and every replay runs it into the captured output."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        self.out.copy_(self.fn())


def _capture_like_cuda(fn, device):
    warm = fn()  # the warm-up runs the step for real, as capture_graph's does
    out = torch.empty_like(warm)
    return _ReplayedStep(fn, out), out, None


def test_a_graph_warm_up_leaves_the_linear_states_as_they_were(tiny, frames, monkeypatch):
    """Capturing a static step runs it once before recording it. That rewrites a key/value slot
    that the first real step rewrites anyway, but a linear-attention layer's conv and recurrent
    states would take the warm-up's token in, and the replay would take it in again: the
    states are put back after the warm-up, for one answer and for rows decoded together."""
    from adatp_core import batching, steps

    monkeypatch.setattr(steps, "capture_graph", _capture_like_cuda)
    monkeypatch.setattr(steps, "no_graph_reason", lambda adapter: None)  # as on CUDA: one answer and rows alike
    tiny.static_decoders.clear()
    state = prune_tokens(extract_attention(tiny, frames, QUESTION, layer=tiny.adapter.default_layer()), 0.25)
    cfg = dict(max_new_tokens=6, ignore_eos=True)
    default = generate_answer(state, SamplingConfig(**cfg, decode_mode="default"), return_logits=True)
    for _ in range(2):  # captured, then replayed for a second answer
        static = generate_answer(state, SamplingConfig(**cfg, decode_mode="static"), return_logits=True)
        assert static.stats["static_graph"] in ("captured", "reused")
        assert static.token_ids == default.token_ids
        assert (static.logits - default.logits).abs().max().item() < 3e-5
    rows = {f.key: f.answer for f in batching.decode_together(
        tiny, SamplingConfig(**cfg, decode_mode="static"), [(i, lambda: state) for i in range(3)], 2)}
    assert [rows[i].token_ids for i in range(3)] == [default.token_ids] * 3
class _GraphOnTheCpu:
    """A CUDA graph's semantics where there is none: capturing records the step without running
    it, replaying runs it (static_decode.capture_graph's warm-up step does run)."""

    def __init__(self, step, out):
        self.step, self.out = step, out

    def replay(self):
        self.out.copy_(self.step())


def test_a_graph_capture_leaves_the_linear_states_as_they_were(tiny, frames, monkeypatch):
    """The capture's warm-up step ran the step once more: each linear layer's conv and recurrent
    state took the first decode token in twice, so the first static answer on CUDA (auto's pick
    for short caches) went astray after one token. A failed capture then stepping without a
    graph did the same."""
    from adatp_core import static_decode, steps

    if not _hybrid(tiny):
        pytest.skip("no linear-attention state to fold twice")

    def capture(step, device):
        out = step().clone()  # the warm-up runs; the capture itself runs nothing
        return _GraphOnTheCpu(step, out), out, None

    real_init = static_decode.StaticDecoder.__init__
    monkeypatch.setattr(static_decode.StaticDecoder, "__init__",
                        lambda self, *a, use_graph=None, **k: real_init(self, *a, use_graph=True, **k))
    state = prune_tokens(extract_attention(tiny, frames, QUESTION, layer=tiny.adapter.default_layer()),
                         retention=0.5)
    default = generate_answer(state, SamplingConfig(max_new_tokens=STEPS, ignore_eos=True, decode_mode="default"),
                              return_logits=True)
    for fake in (capture, lambda step, device: (step(), (_ for _ in ()).throw(RuntimeError("capture refused")))):
        tiny.static_decoders.clear()
        monkeypatch.setattr(steps, "capture_graph", fake)
        static = generate_answer(state, SamplingConfig(max_new_tokens=STEPS, ignore_eos=True, decode_mode="static"),
                                 return_logits=True)
        assert static.stats["static_graph"] in ("captured", "failed: capture refused")
        assert static.token_ids == default.token_ids
        assert (static.logits - default.logits).abs().max().item() < TOL
    tiny.static_decoders.clear()
