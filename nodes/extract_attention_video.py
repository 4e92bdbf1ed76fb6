"""AdaTP Extract Attention (Video File): Extract Attention over a ComfyUI VIDEO backed by a file,
streamed: the sampled frames are decoded, preprocessed and encoded a chunk at a time, so all of them
never exist at once and a long video costs what survives pruning, not its frames (issue 30).

Core Load Video gives such a VIDEO for a file in the input folder; API nodes give one backed by bytes
(written to ComfyUI's temp folder for the decoders, as Sample Video does). A VIDEO held as frames
(Create Video) or cropped is sampled into frames first (Sample Video's path), then encoded as an IMAGE.
"""

from __future__ import annotations

from dataclasses import replace

from ..adatp_core.attention import DEFAULT_PREFILL_CHUNK, extract_attention
from ..adatp_core.fits import check_video_fits
from ..adatp_core.peak_memory import stage_peak
from ..adatp_core.pipeline import PipelineConfig, decode_side
from ..adatp_core.streaming import encode_video
from ..adatp_core.video import MAX_FRAMES, plan_sampling
from . import comfy_bridge as bridge
from .extract_attention import AdaTP_ExtractAttention
from .inputs import checked
from .load_video import AdaTP_LoadVideo
from .sample_video import sampled_frames, video_file


def extract_from_video(model, video, question, layer, query, num_frames, sampling, fps, start_time=0.0,
                       end_time=0.0, max_pixels=0, on_frame=None):
    """(AdaTPState, VideoInfo) for a ComfyUI VIDEO: streamed from its file (checked against the model's
    context and the run's peak before any frame is decoded), else from its sampled frames."""
    stats: dict = {}
    device = model.adapter.device
    with video_file(video) as found:
        if found is not None:
            path, label, clip = found
            sample = plan_sampling(path, num_frames, sampling, fps, start_time, end_time, decode_side(max_pixels), clip)
            # The retention is set downstream (Prune Tokens): the check assumes its default, as the
            # graph is built for pruning; without one it counted every layer's keys and values for every
            # token (the stock model) and refused long videos that the graph runs. Generate Answer places
            # layers >= K's keys and values when it starts (Places.kv None), knowing the kept tokens.
            fit = check_video_fits(model, sample, [question], max_pixels, layer=layer, streamed=True,
                                   prefill_chunk=DEFAULT_PREFILL_CHUNK, retention=PipelineConfig.retention)
            places = replace(fit.places, kv=None)
            with stage_peak(stats, "encode", device):
                encoded = encode_video(model, sample, max_pixels, on_frame=on_frame, layer=layer, places=places)
            with stage_peak(stats, "prefill", device):
                state = extract_attention(model, encoded, question, layer, query, max_pixels=max_pixels)
            state.stats.update({**fit.figures, **encoded.stats, **stats})
            return state, replace(encoded.info, path=label)
    frames, info = sampled_frames(video, num_frames, sampling, fps, start_time, end_time)
    with stage_peak(stats, "prefill", device):
        state = extract_attention(model, frames, question, layer, query, video_info=info, max_pixels=max_pixels)
    state.stats.update(stats)
    return state, info


class AdaTP_ExtractAttentionVideo:
    DESCRIPTION = ("Extract Attention over a VIDEO (core Load Video, a video model, an API node), streamed: the "
                   "sampled frames are decoded, preprocessed and encoded a chunk at a time, so all of them never "
                   "exist at once and long videos fit. Checks the model's context and the run's memory before "
                   "decoding anything. A VIDEO held as frames (Create Video) is sampled into frames first.")
    CATEGORY = "AdaTP"
    RETURN_TYPES = ("ADATP_STATE", "ADATP_VIDEO_INFO")
    RETURN_NAMES = ("state", "video_info")
    OUTPUT_TOOLTIPS = (AdaTP_ExtractAttention.OUTPUT_TOOLTIPS[0], AdaTP_LoadVideo.OUTPUT_TOOLTIPS[1])
    FUNCTION = "extract"

    @classmethod
    def INPUT_TYPES(cls):
        extract = AdaTP_ExtractAttention.INPUT_TYPES()
        load = AdaTP_LoadVideo.INPUT_TYPES()["required"]
        num_frames = (load["num_frames"][0], {**load["num_frames"][1], "min": 0, "max": MAX_FRAMES, "tooltip": (
            "Frames to sample (uniform), or the most frames to take (fps; 0: every 1/fps seconds of the whole "
            "video, e.g. fps 1 for one frame a second). Limited by what the run's memory holds, checked before "
            "decoding.")})
        return {"required": {
            "model": extract["required"]["model"],
            "video": ("VIDEO", {"tooltip": "A VIDEO backed by a file (core Load Video) is streamed a chunk of "
                                           "frames at a time."}),
            **{name: extract["required"][name] for name in ("question", "layer", "query")},
            "num_frames": num_frames,
            **{name: load[name] for name in ("sampling", "fps", "start_time", "end_time")},
        }, "optional": {
            "max_pixels": extract["optional"]["max_pixels"],
        }}

    @checked
    def extract(self, model, video, question, layer, query, num_frames, sampling, fps, start_time, end_time,
                max_pixels=0):
        bridge.check_interrupt()
        bridge.activate(model)
        progress = bridge.Progress(max(num_frames, 1))
        return extract_from_video(model, video, question, layer, query, num_frames, sampling, fps, start_time,
                                  end_time, max_pixels, on_frame=progress.step)


