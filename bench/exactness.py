#!/usr/bin/env python3
"""Print the exactness errors that the tests bound (float32, the tiny model, CPU).

    python bench/exactness.py

- retention 1.0 against stock generate(): greedy tokens and the largest logit error;
- random keep sets against a full-sequence run with the dropped keys masked at
  layers >= K (prefill and 8 decode steps);
- the layer K-1 scores against eager attention's probabilities.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from reference import masked_logits, stock_inputs_embeds  # noqa: E402

from adatp_core.attention import extract_attention  # noqa: E402
from adatp_core.generate import SamplingConfig, generate_answer  # noqa: E402
from adatp_core.models.loader import load_video_llm  # noqa: E402
from adatp_core.models.tiny import ensure_tiny_model  # noqa: E402
from adatp_core.prune import prune_tokens  # noqa: E402
from adatp_core.samples import scene_frames  # noqa: E402

QUESTION = "What is the red square doing in this video?"
STEPS = 8


def main() -> int:
    from transformers import LlavaOnevisionForConditionalGeneration

    folder = ensure_tiny_model()
    ours = load_video_llm(folder, device="cpu", dtype="float32")
    stock = {a: LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                                        attn_implementation=a).eval()
             for a in ("sdpa", "eager")}
    frames = torch.from_numpy(scene_frames(num_frames=4, width=128, height=96, scenes=2)).float() / 255
    pixels = ours.adapter.preprocess(frames)
    cfg = SamplingConfig(max_new_tokens=STEPS, do_sample=False)  # as the stock call; the penalty: the model's, for both
    for layer in (0, 2):
        state = extract_attention(ours, frames, QUESTION, layer=layer)
        ids = state.prompt.input_ids[None]
        full = generate_answer(prune_tokens(state, 1.0), cfg, return_logits=True)
        with torch.inference_mode():
            out = stock["sdpa"].generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         pixel_values_videos=pixels[None], max_new_tokens=STEPS, do_sample=False,
                                         output_logits=True, return_dict_in_generate=True)
        same = list(full.token_ids) == out.sequences[0, ids.shape[1]:].tolist()[: len(full.token_ids)]
        err = (full.logits - torch.cat(out.logits).float()[: full.logits.shape[0]]).abs().max().item()
        print(f"K={layer} R=1.0 vs stock generate: same greedy tokens: {same}; max logit error {err:.2e}")
        worst = 0.0
        for seed in range(4):
            gen = torch.Generator().manual_seed(seed)
            keep = torch.sort(torch.randperm(state.num_visual, generator=gen)[: int(
                torch.randint(1, state.num_visual, (1,), generator=gen))]).values
            pruned = generate_answer(state.evolve(keep=keep), cfg, return_logits=True)
            dropped = torch.ones(state.num_visual, dtype=torch.bool)
            dropped[keep] = False
            with torch.inference_mode():
                embeds = stock_inputs_embeds(stock["sdpa"], state.prompt.input_ids, pixels)
                tokens = torch.tensor(pruned.token_ids, dtype=torch.long)
                seq = torch.cat([embeds, stock["sdpa"].model.get_input_embeddings()(tokens)[None]], dim=1)
                ref = masked_logits(stock["sdpa"], seq, state.prompt.visual_positions[dropped], layer)
            n = state.prompt.length
            worst = max(worst, (pruned.logits - ref[n - 1: n - 1 + pruned.logits.shape[0]]).abs().max().item())
        print(f"K={layer} random keep sets (4) vs masked full-sequence reference, prefill + {STEPS - 1} "
              f"decode steps: max logit error {worst:.2e}")
    for layer in (1, 2, 3):
        state = extract_attention(ours, frames, QUESTION, layer=layer)
        ids = state.prompt.input_ids[None]
        with torch.inference_mode():
            att = stock["eager"](input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pixels[None],
                                 output_attentions=True).attentions[layer - 1][0]
        expected = att[:, state.prompt.after_video:][:, :, state.prompt.visual_positions].mean(dim=(0, 1))
        print(f"K={layer} scores vs eager attention probabilities: max error "
              f"{(state.scores - expected).abs().max().item():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
