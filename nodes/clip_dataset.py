"""AdaTP Clip Dataset: long videos in ComfyUI's input folder -> shots -> clips cut to the
trainers' rules -> captions, written as a training set under ComfyUI's output folder."""

from __future__ import annotations

from pathlib import Path

from ..adatp_core.clips.cut import CUT_MODES
from ..adatp_core.clips.job import run_clips
from ..adatp_core.clips.plan import FRAME_RULES, MAX_FPS, MAX_SECONDS, MAX_SIDE, MAX_TRIM_FRAMES, ClipRules
from ..adatp_core.clips.settings import DEFAULT_LAYOUTS, LAYOUTS, ClipsJob, parse_layouts
from ..adatp_core.errors import AdaTPInputError
from ..adatp_core.models.loader import activate, release
from ..adatp_core.paths import check_inside, check_name
from ..adatp_core.pipeline import PipelineConfig
from ..adatp_core.sampling import WIDGETS, settings_text, widget_sampling
from . import comfy_bridge as bridge
from .caption_folder import DECODE_WORKERS, AdaTP_CaptionFolder, ensure_sample_folder
from .inputs import checked, validation
from .load_video import input_paths

SAMPLE_SOURCES = "adatp_clip_samples"  # made in the input folder with the pack's sample video (3 shots)
DEFAULT_OUTPUT = "adatp_clips"
STAGES = ("shots", "cut", "caption")  # one third of the progress bar each


def resolve_sources(text: str) -> list[Path]:
    """Each line of ``text``: a video or a folder of videos under ComfyUI's input directory
    (Load Video's rules: no '..', no link out, nothing outside opened), as typed (links inside the input
    directory not followed, as the CLI takes a path: a link re-pointed at other footage is told by the
    path given, and the job checks again that each leads inside)."""
    text = check_name(text, "source")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise AdaTPInputError("no sources: type a folder or a video under ComfyUI's input directory, one a line.")
    paths = []
    for name in names:
        typed, path, name = input_paths(name, "source")
        if name == SAMPLE_SOURCES and not path.exists():
            ensure_sample_folder(path)
        if not path.exists():
            raise AdaTPInputError(f"source {name!r} is not in ComfyUI's input directory "
                                  f"({bridge.input_directory()}); put the video or folder there.")
        paths.append(typed)
    return paths


def resolve_output(name: str) -> Path:
    """A folder under ComfyUI's output directory (made if missing)."""
    name = check_name(name, "output folder").strip()
    if not name or "\x00" in name or "://" in name:
        raise AdaTPInputError("the output folder name is empty or not a folder name; type a folder name such as "
                              f"{DEFAULT_OUTPUT!r}: it is made under ComfyUI's output directory.")
    root = bridge.output_directory()
    path = check_inside([root], root / name, "node", shown=name)
    if path == check_inside([root], root, "node"):
        raise AdaTPInputError("the output folder is ComfyUI's output directory itself; type a folder name such as "
                              f"{DEFAULT_OUTPUT!r} for the training set.")
    return path


class StageProgress:
    """ComfyUI's progress bar over the three stages (shots found, clips cut, clips captioned), a
    third each; Cancel is checked at every step."""

    def __init__(self):
        self.bar = bridge.Progress(100 * len(STAGES))

    def __call__(self, stage: str, done: float, total: float, _name: str) -> None:
        self.bar.set(int(100 * STAGES.index(stage) + (100 * done / total if total else 100)))


class AdaTP_ClipDataset:
    DESCRIPTION = ("From long footage to a video training set: finds the shots of every video in sources, cuts them "
                   "into clips of min to max seconds at the trainer's frame rate and frame counts (4k+1: Wan, "
                   "HunyuanVideo; 8k+1: LTX-Video), captions each clip with AdaTP and writes the set under ComfyUI's "
                   "output folder: videos/NAME.mp4 with NAME.txt, clips.jsonl, finetrainers' prompts.txt and "
                   "videos.txt, and each source's shots with captions as .srt/.vtt. Run it again: what is done "
                   "is skipped.")
    CATEGORY = "AdaTP"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("summary",)
    OUTPUT_TOOLTIPS = ("Sources, shots, clips cut, clips captioned and failed (with reasons), and the files written.",)
    OUTPUT_NODE = True
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        rules = ClipRules()
        caption = AdaTP_CaptionFolder.INPUT_TYPES()
        return {"required": {
            "model": ("ADATP_MODEL", {"tooltip": "From Load Video LLM: the model that captions the clips."}),
            "sources": ("STRING", {"multiline": True, "default": SAMPLE_SOURCES,
                                   "tooltip": "Videos or folders of videos under ComfyUI's input directory, one a "
                                              "line. adatp_clip_samples holds the pack's sample video (3 shots)."}),
            "output": ("STRING", {"default": DEFAULT_OUTPUT,
                                  "tooltip": "The training set's folder under ComfyUI's output directory: clips in "
                                             "videos/, the layout files beside it."}),
            "prompt": caption["required"]["prompt"],
            "prefix": caption["required"]["prefix"],
            "min_seconds": ("FLOAT", {"default": rules.min_seconds, "min": 0.0, "max": MAX_SECONDS, "step": 0.01,
                                      "tooltip": "The shortest clip, first frame to last (n frames last (n-1)/fps); a "
                                                 "shorter shot is dropped unless keep_short."}),
            "max_seconds": ("FLOAT", {"default": rules.max_seconds, "min": 0.1, "max": MAX_SECONDS, "step": 0.01,
                                      "tooltip": "The longest clip, first frame to last: n frames last (n-1)/fps (5 at "
                                                 "16 fps: Wan's 81 frames; 5.34 at 24 fps: HunyuanVideo's 129); a "
                                                 "longer shot gives several clips."}),
            "fps": ("FLOAT", {"default": rules.fps, "min": 0.0, "max": MAX_FPS, "step": 0.001,
                              "tooltip": "The clips' frame rate (Wan: 16, HunyuanVideo: 24, LTX-Video: 24); 0 keeps "
                                         "each source's own rate."}),
            "frames": (list(FRAME_RULES), {"default": rules.frames,
                                           "tooltip": "Frame counts the trainer takes: 4k+1 (Wan, HunyuanVideo), "
                                                      "8k+1 (LTX-Video) or any. Each clip gets the largest count "
                                                      "that fits its shot."}),
        }, "optional": {
            "trim_frames": ("INT", {"default": rules.trim_frames, "min": 0, "max": MAX_TRIM_FRAMES,
                                    "tooltip": "Frames dropped at each end of a shot, so transition frames stay out."}),
            "keep_short": ("BOOLEAN", {"default": rules.keep_short,
                                       "tooltip": "Keep a shot shorter than min_seconds as one clip."}),
            "max_side": ("INT", {"default": rules.max_side, "min": 0, "max": MAX_SIDE, "step": 2,
                                 "tooltip": "Cap the long side at this many pixels (aspect kept, even sizes); 0 "
                                            "keeps the size."}),
            "threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Shot detection threshold: lower finds more cuts. 0: the detector's "
                                               "default."}),
            "cut": (list(CUT_MODES), {"default": "reencode",
                                      "tooltip": "reencode: exact frames, H.264 (for training); copy: stream copy "
                                                 "at keyframes, fast, frame counts not exact."}),
            "keep_audio": ("BOOLEAN", {"default": False, "tooltip": "Keep the audio in the clips."}),
            "crf": ("INT", {"default": 18, "min": 0, "max": 51,
                            "tooltip": "H.264 quality when re-encoding (lower is better; 18 is visually lossless)."}),
            "layouts": ("STRING", {"default": ",".join(DEFAULT_LAYOUTS),
                                   "tooltip": f"What to write, separated by commas: {', '.join(LAYOUTS)} (txt: "
                                              "NAME.txt beside each clip; finetrainers: prompts.txt + videos.txt; "
                                              "jsonl: clips.jsonl; srt/vtt: subtitles/ per source)."}),
            "recursive": ("BOOLEAN", {"default": False, "tooltip": "Include videos in subfolders of a source folder."}),
            # The caption settings, as Caption Folder declares them (its frames are caption_frames here).
            **{name: caption["required"][name] for name in ("suffix", "overwrite")},
            "caption_frames": caption["required"]["frames"],
            **{name: caption["required"][name] for name in ("retention", "layer")},
            **{name: caption["optional"][name] for name in ("max_new_tokens", *WIDGETS, "batch_size")},
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, sources=None, output=None, layouts=None, repetition_penalty=None):
        checks = {"sources": resolve_sources, "output": resolve_output, "layouts": parse_layouts,
                  "repetition_penalty": lambda value: widget_sampling(repetition_penalty=value)}
        return validation(cls, {"sources": sources, "output": output, "layouts": layouts,
                                 "repetition_penalty": repetition_penalty}, lambda name, value: checks[name](value))

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")  # the sources and the output folder may change between runs

    @checked
    def make(self, model, sources, output, prompt, prefix, min_seconds, max_seconds, fps, frames, trim_frames=0,
             keep_short=False, max_side=0, threshold=0.0, cut="reencode", keep_audio=False, crf=18,
             layouts=",".join(DEFAULT_LAYOUTS), recursive=False, suffix="", overwrite=False, caption_frames=32,
             retention=0.25, layer=2, max_new_tokens=256, repetition_penalty=0.0, top_k=-1, batch_size=0):
        sampling = widget_sampling(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty, top_k=top_k)
        cfg = PipelineConfig(num_frames=caption_frames, layer=layer, retention=retention, generation=sampling)
        rules = ClipRules(min_seconds=min_seconds, max_seconds=max_seconds, fps=fps or None, frames=frames,
                          trim_frames=trim_frames, keep_short=keep_short, max_side=max_side)
        job = ClipsJob(sources=tuple(resolve_sources(sources)), out=resolve_output(output), rules=rules,
                       threshold=threshold or None, cut=cut, keep_audio=keep_audio, crf=crf,
                       layouts=parse_layouts(layouts), recursive=recursive, prompt=prompt,
                       prefix=prefix, suffix=suffix, overwrite=overwrite, pipeline=cfg, workers=DECODE_WORKERS,
                       processes=False,  # threads: spawned processes would re-import ComfyUI's main.py
                       batch_size=batch_size, root=bridge.input_directory().resolve(),
                       out_root=bridge.output_directory().resolve())
        bridge.check_interrupt()
        used = []

        def loaded():  # only when some clip needs a caption
            activate(model)
            used.append(model)
            return model

        try:
            summary = run_clips(loaded, job, on_event=StageProgress(), on_step=bridge.check_interrupt)
        finally:
            if used and release(model):
                bridge.soft_empty_cache()
        effective = sampling.resolve(getattr(model.model, "generation_config", None)).settings()
        text = (f"{summary.text()}\nOutput: {job.out}\n"
                f"Generation: {settings_text(effective)} (unset: the model's generation_config.json)")
        if summary.captions().model_error or summary.busy:  # busy: another run holds every source
            raise RuntimeError(text)
        return {"ui": {"text": [text]}, "result": (text,)}
