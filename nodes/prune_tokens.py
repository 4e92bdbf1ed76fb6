"""AdaTP Prune Tokens: keep round(R * N) visual tokens with exact per-segment budgets."""

from __future__ import annotations

from ..adatp_core.prune import prune_tokens
from ..adatp_core.report import flops_line, tokens_line
from .inputs import checked


class AdaTP_PruneTokens:
    DESCRIPTION = ("Keeps the given fraction of visual tokens, split over segments by their shares and "
                   "taken in each segment's pick order. Without the debias nodes this is FastV.")
    CATEGORY = "AdaTP"
    RETURN_TYPES = ("ADATP_STATE", "STRING")
    RETURN_NAMES = ("state", "stats")
    OUTPUT_TOOLTIPS = ("The state with the keep set, for Generate Answer and Preview Tokens.",
                       "Tokens kept and FLOPs, as text.")
    FUNCTION = "prune"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "state": ("ADATP_STATE", {"tooltip": "From Extract Attention or a debias node."}),
            "retention": ("FLOAT", {"default": 0.25, "min": 0.001, "max": 1.0, "step": 0.01,
                                    "tooltip": "R: fraction of visual tokens kept (0.25 keeps a quarter; "
                                               "1.0 keeps all)."}),
        }}

    @checked
    def prune(self, state, retention):
        pruned = prune_tokens(state, retention)
        stats = f"{tokens_line(pruned.stats)}\n{flops_line(pruned.stats)}"
        return {"ui": {"text": [stats]}, "result": (pruned, stats)}
