"""AdaTP Preview Tokens: see which tokens were kept, the segments and the attention."""

from __future__ import annotations

from ..adatp_core.preview import draw_tokens
from .inputs import checked


class AdaTP_PreviewTokens:
    DESCRIPTION = ("Draws every frame in one image: kept tokens tinted by the attention heatmap, dropped "
                   "tokens darkened, and each frame framed in its segment's colour. Connect to Preview Image.")
    CATEGORY = "AdaTP"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("All frames tiled into one picture.",)
    FUNCTION = "preview"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "state": ("ADATP_STATE", {"tooltip": "Any AdaTP state; after Prune Tokens it shows the keep set."}),
            "frames": ("IMAGE", {"tooltip": "The frames that went into Extract Attention."}),
        }}

    @checked
    def preview(self, state, frames):
        plan = state.prompt.plan
        return (draw_tokens(frames, state.grid, state.scores, state.segments, state.keep,
                            frames_per_step=plan.frames_per_step if plan is not None else 1),)
