"""AdaTP Frame Times: real frame times for frames from any loader (VideoHelperSuite,
Get Video Components), so Qwen models do not assume 24 fps."""

from __future__ import annotations

from ..adatp_core.video import frames_info
from .inputs import checked


class AdaTP_FrameTimes:
    DESCRIPTION = ("Gives frames from any loader their times: frame i is at start_time + i / fps. Connect the "
                   "loader's fps (VideoHelperSuite's Video Info loaded_fps, Get Video Components' fps) and feed "
                   "video_info to Extract Attention, so Qwen models see the video's real time.")
    CATEGORY = "AdaTP"
    RETURN_TYPES = ("ADATP_VIDEO_INFO",)
    RETURN_NAMES = ("video_info",)
    OUTPUT_TOOLTIPS = ("The frames' times, size and rate, for Extract Attention's video_info.",)
    FUNCTION = "times"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "frames": ("IMAGE", {"tooltip": "The frames, [T, H, W, 3], one every 1/fps seconds."}),
            "fps": ("FLOAT", {"default": 24.0, "min": 0.001, "max": 1000.0, "step": 0.001,
                              "tooltip": "Frames per second of these frames (after any every-nth selection): "
                                         "the loader's fps output."}),
        }, "optional": {
            "start_time": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e6, "step": 0.1,
                                     "tooltip": "Seconds into the video of the first frame (the loader's skip)."}),
        }}

    @checked
    def times(self, frames, fps, start_time=0.0):
        return (frames_info(frames, fps, start_time),)
