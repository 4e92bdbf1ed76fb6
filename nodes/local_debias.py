"""AdaTP Local Debias: spread each segment's picks over spatial positions."""

from __future__ import annotations

from ..adatp_core.debias import local_debias
from .inputs import checked


class AdaTP_LocalDebias:
    DESCRIPTION = ("Inside each segment, takes every spatial position's best token before any position's "
                   "second, so the kept tokens do not all sit at the same place in every frame. Bypass it "
                   "for FastV's top-k inside each segment.")
    CATEGORY = "AdaTP"
    RETURN_TYPES = ("ADATP_STATE",)
    RETURN_NAMES = ("state",)
    OUTPUT_TOOLTIPS = ("The state with the within-segment pick order.",)
    FUNCTION = "debias"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "state": ("ADATP_STATE", {"tooltip": "From Extract Attention or Global Debias."}),
            "max_per_position": ("INT", {"default": 1, "min": 1, "max": 1024,
                                         "tooltip": "M: tokens a position may give per round (1: one each)."}),
        }}

    @checked
    def debias(self, state, max_per_position):
        return (local_debias(state, max_per_position),)
