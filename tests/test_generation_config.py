"""The model's own generation settings (generation_config.json): repetition_penalty,
top_k and the sampling defaults apply where the caller has not set them, with
transformers' logits-processor semantics, so that keeping every token is stock
``generate()`` token for token with the model's generation config left in place."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import QUESTION
from reference import stock_video_kwargs
from test_folders import FAMILIES, cache, family  # noqa: F401  (the tiny model of each family)

from adatp_core.attention import extract_attention
from adatp_core.errors import AdaTPInputError
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.models.loader import load_video_llm
from adatp_core.models.tiny_qwen import ensure_tiny_qwen3_vl
from adatp_core.prune import prune_tokens
from adatp_core.sampling import (HF_DEFAULTS, TokenChooser, apply_repetition_penalty, choose_rows, draw,
                                 settings_text, warp)

STEPS = 12
GREEDY = {"repetition_penalty": 1.3, "top_k": 5}  # top_k acts only when sampling
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.3}


@pytest.fixture(scope="module")
def frames():
    from adatp_core.samples import scene_frames

    return torch.from_numpy(scene_frames(num_frames=4, width=128, height=96, scenes=2)).float() / 255


def with_generation_config(src, dest, settings: dict):
    """A copy of the model folder whose generation_config.json also sets ``settings``."""
    shutil.copytree(src, dest)
    path = dest / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}, indent=2))
    return dest


def load_pair(folder):
    """(ours, the stock model) from the same folder; the stock one reads generation_config.json itself."""
    from conftest import _stock

    return load_video_llm(folder, device="cpu", dtype="float32"), _stock(folder, "sdpa")


def stock_tokens(llm, stock, state, frames, **kwargs) -> list[int]:
    ids = state.prompt.input_ids[None]
    with torch.inference_mode():
        out = stock.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             **stock_video_kwargs(llm, state.prompt, frames), max_new_tokens=STEPS, **kwargs)
    eos = set(llm.adapter.eos_token_ids)
    tokens = out[0, ids.shape[1]:].tolist()
    return tokens[:next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]


@pytest.mark.parametrize("settings", [GREEDY, SAMPLING], ids=["greedy", "sampling"])
def test_keep_all_is_stock_generate_with_the_models_generation_config(family, cache, tmp_path, frames, settings):
    folder = with_generation_config(FAMILIES[family](cache), tmp_path / family, settings)
    llm, stock = load_pair(folder)
    state = prune_tokens(extract_attention(llm, frames, QUESTION, layer=2), retention=1.0)
    assert state.keep.numel() == state.num_visual
    for mode in ("default", "static"):
        ours = generate_answer(state, SamplingConfig(max_new_tokens=STEPS, seed=7, decode_mode=mode))
        torch.manual_seed(7)  # stock generate() draws from the global generator; ours from one seeded alike
        theirs = stock_tokens(llm, stock, state, frames)
        assert list(ours.token_ids) == theirs, (family, mode)
    assert len(set(theirs)) > 1, "the tiny model repeats one token: the test would prove little"
    expected = ({**SAMPLING, "seed": 7} if settings is SAMPLING
                else {"do_sample": False, "repetition_penalty": GREEDY["repetition_penalty"]})
    assert ours.stats["sampling"] == expected  # the effective settings, read from the model's file
    # the settings act: without them the answer differs (so this test can fail)
    plain = generate_answer(state, SamplingConfig(max_new_tokens=STEPS, seed=7, repetition_penalty=1.0, top_k=0,
                                                  do_sample=False))
    assert plain.token_ids != ours.token_ids
    torch.manual_seed(7)
    assert list(plain.token_ids) == stock_tokens(llm, stock, state, frames, repetition_penalty=1.0, top_k=0,
                                                 do_sample=False)


def test_caller_settings_win_and_stats_show_the_effective_ones(cache, tmp_path, frames):
    folder = with_generation_config(ensure_tiny_qwen3_vl(cache), tmp_path / "q3", SAMPLING)
    llm, stock = load_pair(folder)
    state = prune_tokens(extract_attention(llm, frames, QUESTION, layer=2), retention=1.0)
    cfg = SamplingConfig(max_new_tokens=STEPS, do_sample=True, temperature=1.5, top_k=3, top_p=1.0,
                         repetition_penalty=1.1, seed=3)
    ours = generate_answer(state, cfg)
    torch.manual_seed(3)
    assert list(ours.token_ids) == stock_tokens(llm, stock, state, frames, do_sample=True, temperature=1.5, top_k=3,
                                                top_p=1.0, repetition_penalty=1.1)
    assert ours.stats["sampling"] == {"do_sample": True, "temperature": 1.5, "top_k": 3, "top_p": 1.0,
                                      "repetition_penalty": 1.1, "seed": 3}
    from adatp_core.report import stats_text

    assert "sampling (seed 3): temperature 1.5, top_k 3, top_p 1, repetition_penalty 1.1" in stats_text(ours.stats)
    greedy = generate_answer(state, SamplingConfig(max_new_tokens=2, do_sample=False))
    assert greedy.stats["sampling"] == {"do_sample": False, "repetition_penalty": 1.3}
    assert "greedy, repetition_penalty 1.3" in stats_text(greedy.stats)


def test_built_in_tiny_models_stay_neutral(cache):
    """The shipped demo's answers do not change: the tiny models' generation configs set nothing."""
    for build in FAMILIES.values():
        llm = load_video_llm(build(cache), device="cpu", dtype="float32")
        resolved = SamplingConfig().resolve(llm.model.generation_config)
        assert (resolved.do_sample, resolved.repetition_penalty) == (False, 1.0)


def test_resolve_order_and_bad_values():
    model = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05}
    r = SamplingConfig(temperature=0.2).resolve(model)
    assert (r.do_sample, r.temperature, r.top_k, r.top_p, r.repetition_penalty) == (True, 0.2, 20, 0.8, 1.05)
    r = SamplingConfig().resolve({"temperature": -1, "top_p": None, "top_k": "x"})  # a damaged file: defaults
    assert {k: getattr(r, k) for k in HF_DEFAULTS} == HF_DEFAULTS
    assert settings_text(SamplingConfig().resolve().settings()) == "greedy, repetition_penalty 1"
    for bad in ({"top_k": -1}, {"repetition_penalty": 0.0}, {"temperature": 0}, {"top_p": 1.5},
                {"do_sample": "yes"}, {"repetition_penalty": float("nan")}):
        with pytest.raises(AdaTPInputError):
            SamplingConfig(**bad)


def test_floors_on_the_settings_that_divide():
    """Issue 32: a caller's temperature or repetition penalty under 0.01, or not finite, is refused.
    Why: 1e-40 overflows the float32 logits it divides (greedy then picks a seen token every step,
    sampling draws from NaN); at the floor they stay finite. A model's own near-zero temperature
    means "deterministic": greedy under 1e-5 unless the caller samples, else the floor (vLLM's rule)."""
    for name in ("temperature", "repetition_penalty"):
        for bad in (0.0099, 1e-40, 5e-324, 0.0, math.nan, math.inf, -1.0, True):
            with pytest.raises(AdaTPInputError, match=f"{name} must be a finite number of at least 0.01"):
                SamplingConfig(**{name: bad})
        assert getattr(SamplingConfig(**{name: 0.01}), name) == 0.01

    logits = torch.randn(300, generator=torch.Generator().manual_seed(0)) * 30
    seen = torch.zeros(300, dtype=torch.bool)
    seen[:10] = True
    assert torch.isinf(apply_repetition_penalty(logits, seen, 1e-40)).any()
    floor = SamplingConfig(do_sample=True, temperature=0.01, repetition_penalty=0.01, top_k=0).resolve()
    chooser = TokenChooser(floor, torch.arange(10), torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.softmax(warp(chooser._penalise(logits)[None], floor), -1)).all()
    greedy = TokenChooser(SamplingConfig(do_sample=False, repetition_penalty=0.01).resolve(), torch.arange(10))
    assert int(greedy(logits)) == int(torch.argmax(apply_repetition_penalty(logits, seen, 0.01)))

    qwen25 = {"do_sample": True, "temperature": 1e-6, "repetition_penalty": 1.05}  # models built on Qwen2.5-VL
    r = SamplingConfig().resolve(qwen25)
    assert (r.do_sample, r.temperature, r.repetition_penalty) == (False, 0.01, 1.05)
    r = SamplingConfig(do_sample=True).resolve(qwen25)
    assert (r.do_sample, r.temperature) == (True, 0.01)
    r = SamplingConfig().resolve({"do_sample": True, "temperature": 0.005})
    assert (r.do_sample, r.temperature) == (True, 0.01)
    r = SamplingConfig().resolve({"do_sample": True, "temperature": 0.0, "repetition_penalty": 1e-40})
    assert (r.do_sample, r.repetition_penalty) == (False, 1.0)  # a damaged penalty: the default


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_chooser_matches_transformers_processors(device):
    """Scores after the penalty and the warpers equal transformers' processors exactly,
    the history stays on the device, and (on CUDA) no step syncs with the host."""
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    gen = torch.Generator().manual_seed(0)
    vocab, prompt = 300, torch.randint(0, 300, (40,), generator=gen)
    cfg = SamplingConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3).resolve()
    hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7),
                              TopKLogitsWarper(20), TopPLogitsWarper(0.8)])
    chooser = TokenChooser(cfg, prompt, torch.Generator(device=device).manual_seed(1))
    history = prompt.tolist()
    for _ in range(6):
        logits = torch.randn(vocab, generator=gen).to(device) * 3
        expected = hf(torch.tensor([history], device=device), logits[None].clone())
        if chooser.seen is not None:
            assert torch.equal(warp(chooser._penalise(logits)[None], cfg), expected)
        strict = device == "cuda" and chooser.seen is not None  # the prompt's one copy to the device is allowed
        if strict:
            torch.cuda.set_sync_debug_mode("error")
        try:
            token = chooser(logits)
        finally:
            if strict:
                torch.cuda.set_sync_debug_mode("default")
        assert token.device.type == device and chooser.seen.device.type == device
        assert torch.isfinite(expected[0, token]).item()  # drawn from what transformers keeps
        history.append(int(token))
    assert chooser.seen[: vocab].nonzero().squeeze(1).tolist() == sorted(set(history))


def test_draw_gives_the_tokens_that_multinomial_gave():
    """The draw without host checks is multinomial's own race (argmax of p / Exp(1)): a seed
    keeps its tokens, draw after draw from one generator."""
    for seed in range(12):
        vocab = (7, 300, 32000)[seed % 3]
        probs = torch.softmax(torch.randn(1, vocab, generator=torch.Generator().manual_seed(seed)) * 3, -1)
        old, new = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(4):
            assert int(draw(probs, [new])[0]) == int(torch.multinomial(probs, 1, generator=old)[0])


@pytest.mark.parametrize("settings", [GREEDY, SAMPLING, {"repetition_penalty": 3.0}])
def test_rows_chosen_together_are_the_rows_chosen_alone(settings):
    """choose_rows over B answers (each its prompt, history and generator) gives the tokens
    each TokenChooser gives alone, step after step, rows joining and leaving between steps,
    with no host read of any kind (issue 27: one int() and a multinomial per row before)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if any(n in name for n in ("_local_scalar_dense", "multinomial", "nonzero", "equal")):
                self.names.append(name)
            return func(*args, **(kwargs or {}))

    cfg = SamplingConfig(**settings).resolve()
    gen = torch.Generator().manual_seed(0)
    vocab = 300

    def chooser(i):
        return TokenChooser(cfg, torch.randint(0, vocab + 20, (30 + i,), generator=torch.Generator().manual_seed(i)),
                            torch.Generator().manual_seed(100 + i) if cfg.do_sample else None)

    alone = {i: chooser(i) for i in range(6)}
    together = {i: chooser(i) for i in range(6)}
    live = [0, 1, 2, 3]
    for step in range(8):
        logits = torch.randn(len(live), vocab, generator=gen) * 3
        expected = [int(alone[i](logits[r])) for r, i in enumerate(live)]
        with Reads() as reads:
            tokens = choose_rows([together[i] for i in live], logits)
        assert reads.names == []
        assert tokens.tolist() == expected, step
        if cfg.repetition_penalty != 1.0:  # each chosen id joins its own row's history
            assert all(bool(together[i].seen[t]) for i, t in zip(live, expected))
        if step == 3:
            live = [3, 1, 4]  # rows 0 and 2 left, 4 joined and the rows moved
        if step == 5:
            live = [4, 5, 1, 3]
    assert all(torch.equal(together[i].seen, alone[i].seen) for i in (1, 3, 4))


def test_nodes_take_the_models_settings_unless_overridden(cache, tmp_path, frames, monkeypatch):
    """Generate Answer's and Caption Folder's new optional inputs: 0 / -1 (their defaults,
    and what a workflow saved before them gets) mean the model's; other values override.
    Both show the settings in effect."""
    from pack import pack_module

    from adatp_core.samples import sample_video

    folder = with_generation_config(ensure_tiny_qwen3_vl(cache), tmp_path / "q3", SAMPLING)
    llm = load_video_llm(folder, device="cpu", dtype="float32")
    state = extract_attention(llm, frames, QUESTION, layer=2)
    node = pack_module("nodes.generate_answer").AdaTP_GenerateAnswer
    assert list(node.INPUT_TYPES()["optional"])[:2] == ["repetition_penalty", "top_k"]  # then settings (last)
    stats = node().generate(state, 2, False, 1.0, 1.0, 0)["result"][1]  # a workflow saved before the inputs
    assert "greedy, repetition_penalty 1.3" in stats
    stats = node().generate(state, 2, True, 1.0, 1.0, 5, repetition_penalty=1.0, top_k=-1)["result"][1]
    assert "sampling (seed 5): temperature 1, top_k 20, top_p 1, repetition_penalty 1" in stats
    stats = node().generate(state, 2, True, 0.5, 0.9, 5, repetition_penalty=0.0, top_k=0)["result"][1]
    assert "sampling (seed 5): temperature 0.5, top_k 0, top_p 0.9, repetition_penalty 1.3" in stats
    with pytest.raises(ValueError, match="top_k"):  # the pack's own AdaTPInputError
        node().generate(state, 2, False, 1.0, 1.0, 0, top_k=-2)

    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(sample_video(), clips / "a.mp4")
    monkeypatch.setenv("ADATP_CAPTION_ROOTS", str(tmp_path))  # the node reads only from folders it is allowed
    caption = pack_module("nodes.caption_folder").AdaTP_CaptionFolder
    assert list(caption.INPUT_TYPES()["optional"])[1:3] == ["repetition_penalty", "top_k"]  # after max_new_tokens
    run = caption().caption(llm, str(clips), "Describe.", "", "", True, False, 2, 0.5, 2, max_new_tokens=2)
    assert "sampling (seed 0): temperature 0.7, top_k 20, top_p 0.8, repetition_penalty 1.3" in run["result"][1]
    run = caption().caption(llm, str(clips), "Describe.", "", "", True, False, 2, 0.5, 2, max_new_tokens=2,
                            repetition_penalty=1.05, top_k=4)
    assert "temperature 0.7, top_k 4, top_p 0.8, repetition_penalty 1.05" in run["result"][1]


def test_command_line_settings(cache, tmp_path, capsys, monkeypatch):
    """--model with a folder whose generation config samples; the options override it."""
    from adatp_core import cli

    folder = with_generation_config(ensure_tiny_qwen3_vl(cache), tmp_path / "q3", SAMPLING)
    monkeypatch.setenv("ADATP_CACHE_DIR", str(cache))
    base = ["--model", str(folder), "--frames", "2", "--max-new-tokens", "2", "--device", "cpu", "--json"]
    assert cli.main(base) == 0
    assert json.loads(capsys.readouterr().out)["sampling"] == {**SAMPLING, "seed": 0}
    assert cli.main([*base, "--greedy", "--repetition-penalty", "1.0"]) == 0
    assert json.loads(capsys.readouterr().out)["sampling"] == {"do_sample": False, "repetition_penalty": 1.0}
    assert cli.main([*base, "--top-k", "3", "--temperature", "1.5", "--top-p", "0.5", "--seed", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["sampling"] == {
        "do_sample": True, "temperature": 1.5, "top_k": 3, "top_p": 0.5, "repetition_penalty": 1.3, "seed": 4}
    assert cli.main([*base[:-1], "--top-k", "-3"]) == 2
    assert "top_k must be an integer >= 0" in capsys.readouterr().err
