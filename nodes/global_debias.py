"""AdaTP Global Debias: segment the video, give segments budget shares by text relevance."""

from __future__ import annotations

from ..adatp_core.debias import global_debias
from .inputs import checked


class AdaTP_GlobalDebias:
    DESCRIPTION = ("Splits the video into segments of similar consecutive frames and gives each a share "
                   "of the token budget from its relevance to the question, not from attention, which "
                   "piles up on the last frames. Bypass it to split the budget by segment length.")
    CATEGORY = "AdaTP"
    RETURN_TYPES = ("ADATP_STATE",)
    RETURN_NAMES = ("state",)
    OUTPUT_TOOLTIPS = ("The state with segments and budget shares.",)
    FUNCTION = "debias"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "state": ("ADATP_STATE", {"tooltip": "From Extract Attention (or Local Debias)."}),
            "segment_threshold": ("FLOAT", {"default": 0.95, "min": -1.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "tau_s: a new segment starts where neighbouring frames' "
                                                       "cosine similarity drops below this (paper: 0.95)."}),
            "relevance_boost": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                          "tooltip": "beta: how much more budget the most relevant segment gets "
                                                     "(0: by length only)."}),
        }}

    @checked
    def debias(self, state, segment_threshold, relevance_boost):
        return (global_debias(state, segment_threshold, relevance_boost),)
