"""AdaTP Extract Attention: encode the video and run the LLM up to layer K once."""

from __future__ import annotations

from ..adatp_core.attention import (DEFAULT_PREFILL_CHUNK, MAX_PREFILL_CHUNK, QUERY_MODES, extract_attention)
from ..adatp_core.fits import MODEL_BUDGET_WIDGET
from ..adatp_core.models.qwen2_5_vl import DEFAULT_MAX_PIXELS
from . import comfy_bridge as bridge
from .inputs import checked


class AdaTP_ExtractAttention:
    DESCRIPTION = ("Encodes the frames, builds the prompt and runs the LLM's first K layers once "
                   "(a partial prefill), scoring every visual token by the question's attention at "
                   "layer K-1. Connect Generate Answer directly for the vanilla model, or prune first.")
    CATEGORY = "AdaTP"
    RETURN_TYPES = ("ADATP_STATE",)
    RETURN_NAMES = ("state",)
    OUTPUT_TOOLTIPS = ("Tokens, scores and the partial prefill, for the debias, prune and generate nodes.",)
    FUNCTION = "extract"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("ADATP_MODEL", {"tooltip": "From Load Video LLM."}),
            "frames": ("IMAGE", {"tooltip": "Video frames from any loader, [T, H, W, 3]."}),
            "question": ("STRING", {"multiline": True, "default": "What happens in this video?",
                                    "tooltip": "The question, or a captioning instruction."}),
            "layer": ("INT", {"default": 2, "min": 0, "max": 128, "tooltip": "K: prune after this many LLM "
                                                                             "layers. 0 prunes before the LLM, by text relevance."}),
            "query": (list(QUERY_MODES), {"default": "text", "tooltip": "Which tokens' attention scores the video: "
                                                                        "every text token after it (text) or the last one (FastV)."}),
        }, "optional": {
            "video_info": ("ADATP_VIDEO_INFO", {"tooltip": "From Load Video: the frames' times, which Qwen models "
                                                           "use for time (Qwen2.5-VL positions, Qwen3-VL timestamps). "
                                                           "Without it the frames are assumed at 24 fps."}),
            "max_pixels": ("INT", {"default": DEFAULT_MAX_PIXELS, "min": MODEL_BUDGET_WIDGET, "max": 16384 * 16384,
                                   "step": 784,
                                   "tooltip": "Qwen models: each frame is resized to multiples of 28 px (Qwen2.5-VL) "
                                              "or 32 px (Qwen3-VL) within this many pixels. 200704 = 448x448 gives "
                                              "128 tokens per frame on Qwen2.5-VL (4,096 for 32 frames, fine on a "
                                              "24 GB card); more pixels, more detail and memory. 0: the pack's "
                                              "default (448x448). -1: the model's own budget (its video processor: "
                                              "Qwen3-VL/3.5/3.6 spread 25,165,824 px over the whole video, e.g. "
                                              "11,520 tokens for 32 frames of 720p). The stats say which ran. "
                                              "LLaVA-OneVision always uses 384x384."}),
            "prefill_chunk": ("INT", {"default": DEFAULT_PREFILL_CHUNK, "min": 0, "max": MAX_PREFILL_CHUNK, "step": 64,
                                      "tooltip": "Tokens per forward call of the prefill. A longer video runs the "
                                                 "first K layers, and later the kept tokens, chunk by chunk, so only "
                                                 "one chunk's activations are in memory at a time: long videos fit. "
                                                 "Same answer as one call. A video within one chunk runs as before; "
                                                 "0: the whole prompt in one call. Hybrid models (Qwen3.5) round it "
                                                 "to multiples of 64."}),
        }}

    @checked
    def extract(self, model, frames, question, layer, query, video_info=None, max_pixels=0,
                prefill_chunk=DEFAULT_PREFILL_CHUNK):
        bridge.check_interrupt()
        bridge.activate(model)
        return (extract_attention(model, frames, question, layer, query, video_info=video_info,
                                  max_pixels=max_pixels, prefill_chunk=prefill_chunk),)
