"""What a clips run did (``ClipsSummary``): its counts, the sources that failed or that another run
holds, those moved or gone, the caption run's summary, the layouts written; its text and exit status."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..caption import CaptionSummary, ClipClaim, grouped
from ..caption.files import printable
from .settings import CLIPS_FOLDER, STATE_FOLDER

EXIT_BUSY = 3  # the exit status when every source was held by another run (nothing done)


@dataclass
class ClipsSummary:
    """What a clips run did: sources, shots, clips cut, the caption run's summary, the layouts."""

    sources: int = 0
    failed_sources: list = field(default_factory=list)  # (name, why)
    shots: int = 0
    clips_planned: int = 0
    clips_cut: int = 0
    clips_existing: int = 0
    clips_failed: list = field(default_factory=list)  # (name, why)
    shots_without_clip: int = 0
    clips_replaced: int = 0  # an earlier plan's clips set aside (the source or the rules changed)
    clips_restored: int = 0  # clips set aside earlier and moved back: asked for again as they were made
    elsewhere: list = field(default_factory=list)  # sources another run was planning or cutting
    held: list = field(default_factory=list)  # held_by() of each: the process holding it and its claim file
    adopted: list = field(default_factory=list)  # (source, its old path): moved or renamed, its record taken
    gone: list = field(default_factory=list)  # (old source, key, clips on disk): records whose source is gone
    source_seconds: float = 0.0
    detected: int = 0  # sources whose shots were detected this run (the rest came from their records)
    seconds: float = 0.0
    caption: dict = field(default_factory=lambda: CaptionSummary().to_dict())
    outputs: list = field(default_factory=list)  # files the layouts wrote this run
    output_error: str | None = None
    error: str | None = None  # the run stopped (the model could not be loaded, a disk failed)
    uncaptioned: list = field(default_factory=list)  # this run's clips on disk with no caption (paths under out)
    notes: list = field(default_factory=list)  # (source, note): what re-encoding did to it (an HDR source)
    in_videos: bool = True  # the txt layout: those clips sit in videos/ with no NAME.txt beside them

    def captions(self) -> CaptionSummary:
        return CaptionSummary.merge([self.caption])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def merge(cls, parts: list[dict]) -> ClipsSummary:
        total = cls()
        for p in parts:
            for name in ("sources", "shots", "clips_planned", "clips_cut", "clips_existing",
                         "shots_without_clip", "source_seconds", "detected", "clips_replaced",
                         "clips_restored"):
                setattr(total, name, getattr(total, name) + p[name])
            total.failed_sources += [tuple(x) for x in p["failed_sources"]]
            total.uncaptioned += p.get("uncaptioned", [])
            total.notes += [tuple(x) for x in p.get("notes", [])]
            total.in_videos = p.get("in_videos", True)
            total.elsewhere += p.get("elsewhere", [])
            total.held += p.get("held", [])
            total.adopted += [tuple(x) for x in p.get("adopted", [])]
            total.gone += [tuple(x) for x in p.get("gone", [])]
            total.clips_failed += [tuple(x) for x in p["clips_failed"]]
            total.seconds = max(total.seconds, p["seconds"])
            total.outputs += p["outputs"]
            total.output_error = total.output_error or p["output_error"]
            total.error = "; ".join(e for e in (total.error, p.get("error")) if e) or None
        total.caption = CaptionSummary.merge([p["caption"] for p in parts]).to_dict()
        return total

    @property
    def busy(self) -> bool:
        """Every source was held by another run on the same output folder: this run did nothing."""
        return bool(self.elsewhere) and len(self.elsewhere) == self.sources

    def exit_code(self) -> int:
        """0, unless the model, the disk or the layouts failed (2), every source was held by another
        run (EXIT_BUSY, 3), or no clip has a caption (1)."""
        caption = self.captions()
        if caption.model_error or caption.write_error or self.output_error or self.error:
            return 2
        if self.busy:
            return EXIT_BUSY
        if self.clips_planned and not (caption.captions or caption.skipped or caption.done):
            return 1
        return 0 if self.clips_planned or not self.failed_sources else 1

    def text(self, processes: int = 1) -> str:
        rate = self.source_seconds / self.seconds if self.seconds > 0 else 0.0
        reused = self.sources - len(self.failed_sources) - self.detected - len(self.elsewhere)
        lines = [f"Sources: {self.sources} ({len(self.failed_sources)} failed), {self.source_seconds:.1f} s of "
                 f"footage, {self.shots} shot(s) ({self.detected} source(s) analysed now"
                 + (f", {reused} from an earlier run" if reused > 0 else "")
                 + f"), {self.shots_without_clip} shot(s) too short for a clip.",
                 f"Clips: {self.clips_planned} planned, {self.clips_cut} cut now, {self.clips_existing} already "
                 f"there, {len(self.clips_failed)} failed" + (
                     f", {self.clips_replaced} of an earlier plan moved to {STATE_FOLDER}/replaced (the source or "
                     "the rules or the cut changed)" if self.clips_replaced else "") + (
                     f", {self.clips_restored} moved back from {STATE_FOLDER}/replaced (asked for again as they were "
                     "made: the same plan, cut and footage)" if self.clips_restored else "") + "."]
        if self.elsewhere:
            lines += held_text(self.elsewhere, self.held, self.busy)
        if self.adopted:
            lines.append(f"{len(self.adopted)} source(s) moved or renamed, recognised by their content: their clips "
                         "and captions are kept, not cut again: " + ", ".join(
                             f"{printable(old)} -> {printable(new)}" for new, old in self.adopted[:3])
                         + (" ..." if len(self.adopted) > 3 else ""))
        if self.gone:
            lines.append(f"{len(self.gone)} source(s) recorded in {STATE_FOLDER}/sources are no longer where they "
                         "were: " + ", ".join(f"{printable(src)} ({n} clip(s))" for src, _, n in self.gone[:3])
                         + (" ..." if len(self.gone) > 3 else "") + ". Their clips stay in the set. If the footage "
                         "moved, give its new place as a source: it is recognised by its content and keeps its clips "
                         f"and captions. To drop it, remove its record ({STATE_FOLDER}/sources/KEY.json) and its "
                         f"clips ({CLIPS_FOLDER}/KEY_*), then run again.")
        lines += [f"{printable(name)}: {note}" for name, note in self.notes]
        lines += grouped("source failed", [(printable(n), printable(why)) for n, why in self.failed_sources])
        lines += grouped("clip failed", self.clips_failed)
        lines.append(self.captions().text(processes))
        if self.uncaptioned:
            more = " ..." if len(self.uncaptioned) > 3 else ""
            lines.append(f"{len(self.uncaptioned)} clip(s) have no caption yet: "
                         + ", ".join(printable(n) for n in self.uncaptioned[:3]) + more + ". "
                         + (f"They stay in {CLIPS_FOLDER}/ without a .txt, so a trainer that reads the folder "
                            "(musubi-tuner, diffusion-pipe, ai-toolkit, SimpleTuner) would train them with an empty "
                            "caption; " if self.in_videos else "")
                         + "the JSONL and finetrainers lists leave them out. Run the same command again to caption "
                           f"them, or move them out of {CLIPS_FOLDER}/.")
        if self.error:
            lines.append(f"Stopped: {self.error}")
        if self.output_error:
            lines.append(f"Writing the layouts failed: {self.output_error}")
        else:
            lines.append(f"Layouts: {len(self.outputs)} file(s) written" + (
                "" if self.outputs else " (all up to date)") + ".")
        if self.seconds > 0 and (self.detected or self.clips_cut or self.captions().done):
            lines.append(f"{self.seconds:.1f} s in all, {rate:.2f} source seconds a second.")
        return "\n".join(lines)


def held_by(name: str, claim: ClipClaim) -> dict:
    """A source another run holds: its name, the holding process (pid, host; None when the claim does
    not say) and the claim file, for a message saying what to do."""
    pid, host = claim.holder() or (None, None)
    return {"source": name, "pid": pid, "host": host, "claim": str(claim.path)}


def held_text(elsewhere: list, held: list, busy: bool) -> list[str]:
    """The summary's lines for the sources another run holds, each with its process and claim file."""
    head = (f"Nothing done: every source ({len(elsewhere)}) is left to another run on the same output folder, "
            "which holds it now" if busy else
            f"{len(elsewhere)} source(s) left to another run on the same output folder now")
    lines = [head + (":" if held else ": " + ", ".join(printable(n) for n in elsewhere[:3])
                     + (" ..." if len(elsewhere) > 3 else ""))]
    for h in held[:5]:
        who = f"process {h['pid']} on {h['host']}" if h.get("pid") else "a process that does not say which"
        lines.append(f"  {printable(h['source'])}: held by {who} (claim {printable(h['claim'])})")
    if len(held) > 5:
        lines.append(f"  ... and {len(held) - 5} more")
    lines.append("  Wait for that run to finish, then run this again: it takes what is left. A claim is a lock "
                 "the system lets go when its process ends, however it ends; if that process is not running (a "
                 "run on another machine over a network share), remove its claim file and run again.")
    return lines
