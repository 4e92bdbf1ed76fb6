"""From long footage to a training set: shots, clips cut to the trainers' rules, captions.

    python -m adatp_core clips films/ --out dataset/ --fps 16 --frames 4k+1 --max-seconds 5
    python -m adatp_core clips a.mp4 b.mkv --out dataset/ --dry-run   # the plan: no cut, no model
    accelerate launch -m adatp_core clips films/ --out dataset/         # the sources shared out

Each source's shots are found, cut into clips of --min-seconds to --max-seconds at --fps
with --frames counts (4k+1: Wan, HunyuanVideo; 8k+1: LTX-Video), written to OUT/videos,
captioned with the caption command's options, and listed in the --layout files:
txt (NAME.txt beside each clip), finetrainers (prompts.txt + videos.txt), jsonl
(clips.jsonl) and srt / vtt (OUT/subtitles: each source's shots with their captions).
A rerun skips what is done: shots kept per source, clips and captions already there.
Exit status: 0 when the clips have captions, 1 when none could be made, 2 for bad
options or a model or disk failure, 3 when every source is held by another run on the
same output folder (nothing done: the summary names each holding process; wait for it,
or remove a claim whose process is gone).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from ..caption import check_options
from ..caption.cli import Distributed, ProgressLine, option_message, run_distributed
from ..caption.files import printable
from ..cli_options import add_caption_arguments, add_model_arguments, load_model, pipeline_config  # the model options, as caption takes them
from ..errors import AdaTPEnvironmentError, AdaTPInputError, AdaTPInterrupted
from .cut import CUT_MODES
from .job import plan_sources, run_clips, write_layouts
from .outputs import readable
from .plan import FRAME_RULES, ClipRules
from .settings import DEFAULT_LAYOUTS, LAYOUTS, ClipsJob, parse_layouts
from .summary import ClipsSummary

log = logging.getLogger(__name__)

OPTIONS = {"min_seconds": "--min-seconds", "max_seconds": "--max-seconds", "fps": "--fps", "clip_frames": "--frames",
           "frames": "--caption-frames",
           "trim_frames": "--trim-frames", "max_side": "--max-side", "threshold": "--threshold", "cut": "--cut",
           "crf": "--crf", "layout": "--layout", "out": "--out", "sources": "SOURCE"}


def frame_rate(value: str):
    if value.strip().lower() == "source":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a frame rate nor 'source'") from None


def layouts(value: str) -> tuple:
    try:
        return parse_layouts(value)
    except AdaTPInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    defaults = ClipRules()
    p = argparse.ArgumentParser(prog="python -m adatp_core clips", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve",
                                epilog="\n".join(__doc__.splitlines()[2:]))
    # text, not Path: Path("") is ".", and ClipsJob refuses an empty path rather than use the current folder
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="videos, or folders of videos")
    p.add_argument("--out", required=True, help="the dataset folder (clips go to OUT/videos)")
    p.add_argument("--recursive", action="store_true", help="include videos in subfolders of a SOURCE folder")
    rules = p.add_argument_group("clips")
    rules.add_argument("--min-seconds", type=float, default=defaults.min_seconds,
                       help=f"shortest clip, first frame to last (default {defaults.min_seconds:g}); a shorter "
                            "shot is dropped "
                            "unless --keep-short")
    rules.add_argument("--max-seconds", type=float, default=defaults.max_seconds,
                       help=f"longest clip, first frame to last: n frames last (n-1)/fps (default "
                            f"{defaults.max_seconds:g}: 81 frames at 16 fps; 5.34 for 129 at 24); a longer shot "
                            "gives several")
    rules.add_argument("--fps", type=frame_rate, default=defaults.fps,
                       help=f"the clips' frame rate, or 'source' (default {defaults.fps:g})")
    rules.add_argument("--trim-frames", type=int, default=defaults.trim_frames,
                       help="frames dropped at each end of a shot, so transition frames stay out (default 0)")
    rules.add_argument("--keep-short", action="store_true", help="keep a shot shorter than --min-seconds as one clip")
    rules.add_argument("--max-side", type=int, default=defaults.max_side,
                       help="cap the long side at this many pixels, aspect kept, even sizes (default 0: keep)")
    rules.add_argument("--threshold", type=float, help="shot detection threshold: lower finds more cuts "
                                                       "(default: the detector's)")
    rules.add_argument("--cut", choices=CUT_MODES, default="reencode",
                       help="reencode (default): exact frames, H.264 yuv420p; copy: stream copy at keyframes, fast")
    rules.add_argument("--keep-audio", action="store_true", help="keep the audio (default: dropped)")
    rules.add_argument("--crf", type=int, default=18, help="H.264 quality for reencode, 0-51 (default 18)")
    rules.add_argument("--layout", type=layouts, default=DEFAULT_LAYOUTS,
                       help=f"what to write, separated by commas: {', '.join(LAYOUTS)}, or all "
                            f"(default {','.join(DEFAULT_LAYOUTS)})")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (shots, clips, durations, frame counts); cut nothing, load no model")
    p.add_argument("--json", action="store_true", help="print the plan or the summary as JSON")
    caption = p.add_argument_group("captions")
    add_caption_arguments(caption)  # the caption command's options, from their one definition
    add_caption_arguments(caption, decode_only=True)
    add_model_arguments(caption, max_new_tokens=256, one_answer=False)
    # The caption command's --frames (frames sampled per clip) is --caption-frames here: --frames is the rule.
    rules.add_argument("--frames", dest="clip_frames", choices=FRAME_RULES, default=defaults.frames,
                       help=f"frame counts the trainer takes (default {defaults.frames}: Wan, HunyuanVideo; "
                            "8k+1: LTX-Video); each clip gets the largest count that fits its shot")
    caption.add_argument("--caption-frames", dest="frames", type=int, default=32,
                         help="frames sampled from each clip for its caption (the caption command's --frames; "
                              "default 32)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def make_job(args) -> ClipsJob:
    rules = ClipRules(min_seconds=args.min_seconds, max_seconds=args.max_seconds, fps=args.fps,
                      frames=args.clip_frames, trim_frames=args.trim_frames, keep_short=args.keep_short,
                      max_side=args.max_side)
    return ClipsJob(sources=tuple(args.sources), out=args.out, rules=rules, threshold=args.threshold, cut=args.cut,
                    keep_audio=args.keep_audio, crf=args.crf, layouts=args.layout, recursive=args.recursive,
                    prompt=args.prompt, prefix=args.prefix, suffix=args.suffix, overwrite=args.overwrite,
                    pipeline=pipeline_config(args), workers=args.workers, batch_size=args.batch_size)


def message(exc: Exception, args) -> str:
    option = getattr(exc, "option", None)
    text = printable(str(exc))
    if option in OPTIONS and not text.startswith(OPTIONS[option]):
        return f"{OPTIONS[option]}: {text}"
    return option_message(exc, args)


class Progress:
    """Progress on stderr: a line per source analysed, then the caption command's bar for the
    clips cut and the clips captioned."""

    EVERY_S = 10.0  # a long source's detection: a line this often

    def __init__(self, label: str):
        self.label, self.bars, self.said = label, {}, time.monotonic()

    def __call__(self, stage: str, done: float, total: float, name: str) -> None:
        if stage == "shots":
            now = time.monotonic()
            if done == int(done):
                print(f"{self.label}shots: {int(done)}/{int(total)} sources  {printable(name)}", file=sys.stderr)
            elif now - self.said >= self.EVERY_S:
                print(f"{self.label}shots: {printable(name)} {100 * (done - int(done)):.0f}% analysed",
                      file=sys.stderr)
            else:
                return
            self.said = now
            return
        bar = self.bars.get(stage)
        if bar is None or bar.total != total:
            bar = self.bars[stage] = ProgressLine(int(total), f"{self.label}{stage}: ")
        if done:  # 0: the stage begins
            bar.update(printable(name))


def gather(dist: Distributed, summary: ClipsSummary) -> ClipsSummary:
    """Every process's summary merged, once every process has finished."""
    if dist.state is None:
        return summary
    from accelerate.utils import gather_object

    dist.state.wait_for_everyone()
    return ClipsSummary.merge(gather_object([summary.to_dict()]))


def run(args, dist: Distributed) -> int:
    label = f"[{dist.index + 1}/{dist.count}] " if dist.count > 1 else ""
    try:
        job = make_job(args)
        check_options(job.prompt, job.pipeline, job.workers)
    except (AdaTPInputError, AdaTPEnvironmentError, OSError) as exc:
        print(f"{label}error: {message(exc, args)}", file=sys.stderr)
        return 2
    progress = Progress(label)
    if args.dry_run:
        plan = plan_sources(job, (dist.index, dist.count), progress, dry_run=True)
        print(json.dumps(readable(plan.to_dict()), indent=1, ensure_ascii=False) if args.json else plan.text())
        if job.cut == "copy" and not args.json:
            print("--cut copy: each clip will start at the first keyframe at or after its start, at the source's "
                  "rate and size, so its frames differ from this plan (the JSONL gives what is written).")
        return 0 if plan.clips or not (plan.problems or any(p.error for p in plan.sources)) else 1

    def model():
        return load_model(args.model, dist.device(args.device), args.dtype)

    try:
        summary = run_clips(model, job, (dist.index, dist.count), progress, layouts=dist.count == 1)
    except (KeyboardInterrupt, AdaTPInterrupted):
        print(f"\n{label}interrupted: the clips and captions written so far are kept; run the same command "
              "again to continue.", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  the model failed to load, a disk failed: said, not a traceback
        log.debug("clips job failed", exc_info=True)
        known = isinstance(exc, (AdaTPInputError, AdaTPEnvironmentError, OSError))
        why = message(exc, args) if known else f"{exc.__class__.__name__}: {printable(str(exc))}"
        print(f"{label}error: {why}", file=sys.stderr)
        # The other processes wait for this one's summary: it goes to them with the error in it.
        summary = ClipsSummary(error=f"{label}{why}")
    summary = gather(dist, summary)
    if dist.main:
        if dist.count > 1:
            write_layouts(job, summary)
        print(json.dumps(readable(summary.to_dict()), indent=1, ensure_ascii=False) if args.json
              else summary.text(dist.count))
    return summary.exit_code()


def main(argv=None, as_program: bool = False) -> int:
    return run_distributed(run, build_parser().parse_args(argv), as_program)
