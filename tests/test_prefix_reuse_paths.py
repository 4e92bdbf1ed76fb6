"""The video prefix cache where users meet it: the CLI's repeated --question, ComfyUI's
Extract Attention nodes and model management, and models split over devices."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import QUESTION
from test_memory import comfy, load, nodes  # noqa: F401  (comfy: the stub ComfyUI fixture)
from test_split_model import _tiny_map, split  # noqa: F401  (split: layers 2.. on the meta device)

from adatp_core import cli
from adatp_core.attention import extract_attention
from adatp_core.debias import global_debias, local_debias
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.prune import prune_tokens


def test_cli_asks_several_questions_of_one_decoded_video(tiny_dir, monkeypatch, capsys):
    from adatp_core import pipeline

    monkeypatch.setenv("ADATP_CACHE_DIR", str(tiny_dir.parent))
    decodes = []
    real = pipeline.encode_video  # the CLI streams every path through stream_checked's encode_video
    monkeypatch.setattr(pipeline, "encode_video", lambda *a, **k: decodes.append(a) or real(*a, **k))
    argv = ["--frames", "4", "--max-new-tokens", "3", "--json", "--question", "Who?",
            "--question", "Where does the red square go?", "--question", "Who?"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    objects = [json.loads(line) for line in lines]  # one JSON object per line, per question
    assert [o["question"] for o in objects] == ["Who?", "Where does the red square go?", "Who?"]
    assert [o["prefix_cache"] for o in objects] == ["miss", "hit", "hit"]
    assert objects[0]["answer"] == objects[2]["answer"]
    assert len(decodes) == 1 and "time_video_decode" in objects[0] and "time_video_decode" not in objects[1]
    assert cli.main(["--frames", "4", "--max-new-tokens", "3", "--question", "Who?", "--question", "Why?"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Question: Who?\nAnswer: ") and "\n\nQuestion: Why?\nAnswer: " in out
    assert out.count("Video prefix: reused") == 1
    # One question: nothing is kept for a next one that this process will not ask.
    assert cli.main(["--frames", "4", "--max-new-tokens", "3", "--question", "Who?", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["prefix_cache"] == "off (not asked for)" and one["answer"] == objects[0]["answer"]


def test_two_extract_nodes_share_one_video_and_unload_drops_it(comfy, frames):  # noqa: F811
    """ComfyUI hands both Extract Attention nodes the same frames object: the hit comes from the
    content hash (a copy hits too). "Unload models" drops the prefixes with the weights."""
    llm = load(keep_loaded=True)
    extract = nodes()["AdaTP_ExtractAttention"]()
    first = extract.extract(llm, frames[:2], "What moves?", 2, "text")[0]
    second = extract.extract(llm, frames[:2].clone(), "What is red?", 2, "text")[0]
    assert (first.stats["prefix_cache"], second.stats["prefix_cache"]) == ("miss", "hit")
    assert len(llm.prefix_cache) == 1
    comfy.unload_all_models()  # the stub offloads to "meta": nothing can load back, but nothing is kept
    assert len(llm.prefix_cache) == 0


def test_keep_loaded_off_drops_the_prefixes_with_the_weights(comfy, frames):  # noqa: F811
    llm = load(keep_loaded=False)
    m = nodes()
    state = m["AdaTP_ExtractAttention"]().extract(llm, frames[:2], "What moves?", 2, "text")[0]
    assert len(llm.prefix_cache) == 1
    m["AdaTP_GenerateAnswer"]().generate(state, 2, False, 1.0, 1.0, 0)
    assert len(llm.prefix_cache) == 0


def test_split_model_reuses_the_prefix_on_each_layers_device(split, tiny, frames):  # noqa: F811
    """Layers 2.. on a second device: the prefix's keys stay on their layers' devices and the
    second question's scores and keep set equal the unsplit model's full prefill."""
    split.prefix_cache.clear()
    for i, q in enumerate((QUESTION, "Why?")):
        state = extract_attention(split, frames, q, layer=2)
        assert state.stats["prefix_cache"] == ("miss", "hit")[i]
        ref = extract_attention(tiny, frames, q, layer=2, reuse_prefix=False)
        assert (state.scores - ref.scores).abs().max().item() <= 1e-6
        pruned = prune_tokens(local_debias(global_debias(state)), 0.25)
        assert torch.equal(pruned.keep, prune_tokens(local_debias(global_debias(ref)), 0.25).keep)
    (prefix,) = split.prefix_cache._entries.values()
    assert [k.device.type for k, _ in prefix.key_values] == ["cpu", "cpu"]


@pytest.mark.filterwarnings("ignore:The following device_map keys do not match")
def test_dispatched_split_model_answers_a_second_question_exactly(tiny_dir, tiny, frames, tmp_path):
    """accelerate's dispatch (layers' weights on the disk, run on the CPU): the second question
    hits, and its greedy tokens are the unsplit model's from a full prefill."""
    from accelerate import dispatch_model

    from adatp_core.models.loader import load_video_llm
    from test_split_model import _model_bytes

    device_map = _tiny_map(tiny_dir, int(_model_bytes(tiny) * 0.7))
    llm = load_video_llm(tiny_dir, device="cpu", dtype="float32")
    dispatch_model(llm.model, {k: "cpu" if v == 0 else "disk" for k, v in device_map.items()},
                   main_device="cpu", offload_dir=str(tmp_path))
    cfg = SamplingConfig(max_new_tokens=5, ignore_eos=True)
    for i, q in enumerate((QUESTION, "Why?")):
        state = extract_attention(llm, frames, q, layer=3)
        assert state.stats["prefix_cache"] == ("miss", "hit")[i]
        ref = extract_attention(tiny, frames, q, layer=3, reuse_prefix=False)
        ours = generate_answer(prune_tokens(local_debias(global_debias(state)), 0.25), cfg)
        theirs = generate_answer(prune_tokens(local_debias(global_debias(ref)), 0.25), cfg)
        assert ours.token_ids == theirs.token_ids


def test_a_new_run_keeps_the_prefix_and_the_static_buffers(comfy, frames):  # noqa: F811
    """ComfyUI detaches a loaded model (unpatch_all=False) before every load_models_gpu of it, so
    each node's activate did, and that dropped the prefix and the decode graphs on every Run: the
    second question never hit in a real server. Only a real unload drops them."""
    llm = load(keep_loaded=True)
    m = nodes()
    state = m["AdaTP_ExtractAttention"]().extract(llm, frames[:2], "What moves?", 2, "text")[0]
    m["AdaTP_GenerateAnswer"]().generate(state, 2, False, 1.0, 1.0, 0)
    generate_answer(state, SamplingConfig(max_new_tokens=2, decode_mode="static"))  # buffers kept per model
    assert len(llm.static_decoders) == 1
    again = m["AdaTP_ExtractAttention"]().extract(llm, frames[:2], "What is red?", 2, "text")[0]
    assert again.stats["prefix_cache"] == "hit" and len(llm.prefix_cache) == 1
    assert len(llm.static_decoders) == 1
    comfy.unload_all_models()
    assert len(llm.prefix_cache) == 0 and len(llm.static_decoders) == 0
