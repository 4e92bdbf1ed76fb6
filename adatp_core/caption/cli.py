"""Caption a folder of clips: one .txt per clip, for video LoRA training sets.

    python -m adatp_core caption clips/ --prefix "mytrigger, " --manifest clips.jsonl
    accelerate launch -m adatp_core caption clips/     # one shard of the clips per process
    python -m adatp_core caption ComfyUI/output/video  # clips made in ComfyUI (Save Video's folder)

clip.mp4 gets clip.txt beside it (or at the same relative path under --out).
A clip that already has its .txt is skipped unless --overwrite, so a stopped
run continues where it stopped. Exit status: 0 when at least one clip has a
caption, 1 when none could be captioned, 2 for bad options or a model failure.

Every option, the output folders and the manifest are checked before the model
loads. Two runs on one folder share the work: each clip is claimed before the
model takes it, and a caption another run wrote is kept unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from ..cli_options import add_caption_arguments, add_model_arguments, load_model, pipeline_config
from ..errors import AdaTPEnvironmentError, AdaTPInputError
from .files import Manifest, check_manifest, shown
from .plan import CaptionJob, plan_folder
from .run import caption_folder
from .stream import check_options
from .summary import CaptionSummary

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adatp_core caption", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("folder", type=Path, help="the folder of clips")
    p.add_argument("--out", type=Path, help="write captions under this folder, mirroring the clips' subfolders "
                                            "(default: beside each clip)")
    add_caption_arguments(p)
    p.add_argument("--recursive", action="store_true", help="include clips in subfolders")
    p.add_argument("--manifest", type=Path, help="append one JSON line per clip to this file")
    p.add_argument("--no-save", dest="save", action="store_false",
                   help="write no .txt files: the captions go to --manifest only (a trial run)")
    add_caption_arguments(p, decode_only=True)
    add_model_arguments(p, max_new_tokens=256, one_answer=False)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


class Distributed:
    """This process's place under ``accelerate launch`` (or torchrun); one process otherwise."""

    def __init__(self):
        self.state = None
        self.index, self.count = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import PartialState
            from accelerate.utils import parse_flag_from_env

            # --cpu, or a machine without CUDA: processes talk over gloo.
            cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
            self.state = PartialState(cpu=cpu)
            self.index, self.count = self.state.process_index, self.state.num_processes

    @property
    def main(self) -> bool:
        return self.index == 0

    def device(self, choice: str) -> str:
        return str(self.state.device) if self.state is not None and choice == "auto" else choice

    def shard_manifest(self, manifest: Path | None) -> Path | None:
        if manifest is None or self.count == 1:
            return manifest
        return shard_path(manifest, self.index, self.count)

    def gather(self, summary: CaptionSummary) -> CaptionSummary:
        """Every process's summary merged, after every process has finished."""
        if self.state is None:
            return summary
        from accelerate.utils import gather_object

        self.state.wait_for_everyone()
        return CaptionSummary.merge(gather_object([summary.to_dict()]))

    def close(self) -> None:
        """Destroy the process group before the interpreter exits: a gloo group left to the
        exit handlers can abort the process ("terminate called without an active exception")."""
        if self.state is not None:
            self.state.destroy_process_group()


def shard_path(manifest: Path, index: int, count: int) -> Path:
    return manifest.with_name(f"{manifest.name}.part{index}-of-{count}")


def merge_manifest(manifest: Path, shards: list[Path]) -> int:
    """Append the shards' lines to ``manifest`` in clip order, then delete the shards."""
    records = []
    for shard in shards:
        if shard.exists():
            records += [line for line in shard.read_text(encoding="utf-8").splitlines() if line.strip()]
    records.sort(key=lambda line: json.loads(line)["path"])
    sink = Manifest(manifest)  # a newline first if the manifest's last line lacks one
    try:
        sink.write_lines(records)
    finally:
        sink.close()
    for shard in shards:
        shard.unlink(missing_ok=True)
    return len(records)


def main(argv=None, as_program: bool = False) -> int:
    """The caption command. ``as_program``: this process is ``python -m adatp_core``
    and ends when this returns (see run_distributed)."""
    return run_distributed(run, build_parser().parse_args(argv), as_program)


def run_distributed(run, args: argparse.Namespace, as_program: bool) -> int:
    """run(args, Distributed()) for a command that shares its work under ``accelerate launch``
    (caption, clips): logging as --verbose says, the process group closed after the run."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    dist = Distributed()
    try:
        code = run(args, dist)
    finally:
        dist.close()
    if as_program and dist.count > 1:
        # Every caption and manifest line is written (atomically) and merged by now. Under
        # accelerate launch, the interpreter's teardown of torch's distributed threads now
        # and then aborts a rank ("terminate called without an active exception"), which
        # would turn a finished run into a failed launch: end the process here instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


OPTIONS = {"prompt": "--prompt", "frames": "--frames", "query": "--query", "retention": "--retention",
           "layer": "--layer", "max_pixels": "--max-pixels", "workers": "--workers", "prefix": "--prefix",
           "suffix": "--suffix", "out": "--out", "manifest": "--manifest", "batch_size": "--batch-size"}


def option_message(exc: Exception, args: argparse.Namespace) -> str:
    """The error, led by the option it is about (an output-folder problem without --out
    is about the clip folder)."""
    text = shown(str(exc))
    option = getattr(exc, "option", None)
    if option == "out" and args.out is None:
        return text
    name = OPTIONS.get(option)
    return f"{name}: {text}" if name and not text.startswith(name) else text


def run(args: argparse.Namespace, dist: Distributed) -> int:
    """Caption the folder as this process's share of the clips; the exit status."""
    label = f"[{dist.index + 1}/{dist.count}] " if dist.count > 1 else ""
    manifest = args.manifest.expanduser().resolve() if args.manifest else None
    try:
        if not args.save and manifest is None:
            raise AdaTPInputError("--no-save writes no caption files: give --manifest FILE.jsonl to keep the captions")
        job = CaptionJob(folder=args.folder, out=args.out, prompt=args.prompt, prefix=args.prefix,
                         suffix=args.suffix, overwrite=args.overwrite, recursive=args.recursive,
                         pipeline=pipeline_config(args), workers=args.workers, save=args.save,
                         batch_size=args.batch_size)
        check_options(job.prompt, job.pipeline, job.workers)
        if manifest is not None:
            check_manifest(manifest)  # each process's shard goes beside it
        plan = plan_folder(job, (dist.index, dist.count))  # listing and writability, before the model
    except (AdaTPInputError, AdaTPEnvironmentError, OSError) as exc:
        print(f"{label}error: {option_message(exc, args)}", file=sys.stderr)
        return 2
    try:
        load_start = time.perf_counter()
        model = load_model(args.model, dist.device(args.device), args.dtype)
        log.info("model loaded in %.1f s", time.perf_counter() - load_start)
    except (AdaTPInputError, AdaTPEnvironmentError, OSError) as exc:
        print(f"{label}error: {shown(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001  anything else (memory, a library's own error): said, not a traceback
        log.debug("model load failed", exc_info=True)
        print(f"{label}error: the model could not be loaded: {exc.__class__.__name__}: {shown(str(exc))}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{label}interrupted while loading the model; nothing was written.", file=sys.stderr)
        return 130
    progress = {}

    def on_plan(total: int) -> None:
        progress["bar"] = ProgressLine(total, label)
        if not total:
            print(f"{label}nothing to caption", file=sys.stderr)

    def on_clip(rel, result, _summary) -> None:
        state = "" if result.ok else " (failed)" if result.error else " (another run has it)"
        progress["bar"].update(shown(rel) + state)

    try:
        summary = caption_folder(model, job, (dist.index, dist.count), dist.shard_manifest(manifest),
                                 on_clip=on_clip, on_plan=on_plan, plan=plan)
    except AdaTPInputError as exc:  # settings that fit no clip (the model's depth for --layer)
        print(f"{label}error: {option_message(exc, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{label}interrupted: the captions written so far are kept; run the same command again "
              "to continue.", file=sys.stderr)
        return 130
    summary = dist.gather(summary)
    if dist.main:
        if manifest is not None and dist.count > 1:
            merge_manifest(manifest, [shard_path(manifest, i, dist.count) for i in range(dist.count)])
        print(summary.text(dist.count))
    return summary.exit_code()


class ProgressLine:
    """A plain progress bar on stderr: clips done, clips per minute, ETA.

    On a terminal it redraws one line; elsewhere (logs, CI) it prints a line per clip.
    """

    def __init__(self, total: int, label: str = "", stream=None, width: int = 24):
        self.total, self.label, self.width = total, label, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.count = 0
        self.start = time.perf_counter()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = 60.0 * self.count / elapsed if elapsed > 0 else 0.0
        left = self.total - self.count
        eta = f"{int(left * 60 / rate) // 60}m{int(left * 60 / rate) % 60:02d}s" if rate > 0 else "?"
        filled = self.width * self.count // max(self.total, 1)
        return (f"{self.label}[{'#' * filled}{'.' * (self.width - filled)}] {self.count}/{self.total} clips, "
                f"{rate:.1f} clips/min, ETA {eta}")

    def update(self, name: str = "") -> None:
        self.count += 1
        if self.tty:
            self.stream.write("\r" + self.line() + ("\n" if self.count >= self.total else ""))
        else:
            self.stream.write(self.line() + (f"  {name}" if name else "") + "\n")
        self.stream.flush()
