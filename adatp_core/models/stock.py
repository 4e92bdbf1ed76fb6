"""What transformers' own forward/generate takes for a prompt's video: the stock
path that the exactness checks compare AdaTP with (the self-check, the tests and
the benchmark's baseline all build it here)."""

from __future__ import annotations

import torch


def stock_video_inputs(model, prompt, pixels: torch.Tensor) -> dict:
    """The video keyword arguments of the stock forward/generate for ``prompt``.

    model: a loaded ``VideoLLM``; pixels: ``model.adapter.preprocess(frames, prompt.plan)``.
    LLaVA-OneVision takes the pixels; Qwen also the patch grid, the token types and
    (Qwen2.5-VL) the seconds per temporal patch.
    """
    adapter = model.adapter
    if not hasattr(adapter, "grid_thw"):  # LLaVA-OneVision
        return {"pixel_values_videos": pixels[None]}
    types = torch.zeros(1, prompt.length, dtype=torch.int, device=adapter.device)
    types[0, prompt.visual_positions.to(adapter.device)] = 2
    kwargs = {"pixel_values_videos": pixels, "video_grid_thw": adapter.grid_thw(prompt.plan),
              "mm_token_type_ids": types}
    if model.model.config.model_type == "qwen2_5_vl":
        kwargs["second_per_grid_ts"] = torch.tensor([prompt.plan.seconds_per_step()], device=adapter.device)
    return kwargs
