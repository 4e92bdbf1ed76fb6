"""What captioning did: one clip's result, the manifest record for it, and a run's summary.

No torch here either: a summary travels between processes (``CaptionSummary.to_dict`` /
``merge`` under accelerate) and is read by the command line and the node.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .files import name_record, shown


@dataclass(frozen=True)
class ClipTimes:
    """Where one captioned clip's time went: waiting for its frames, and in the model (its
    prefill and decoding, or its share of a batch's decoding); batch_size: the clips decoded
    together (None: one at a time). ``as_dict``: the manifest's keys for them."""

    wait: float
    model: float
    batch_size: int | None = None

    def as_dict(self) -> dict:
        times = {"time_wait": round(self.wait, 4), "time_model": round(self.model, 4)}
        return times if self.batch_size is None else {**times, "batch_size": self.batch_size}


@dataclass(frozen=True)
class ClipResult:
    """One clip's outcome. caption: the model's text (None on failure); stats:
    tokens kept/total, FLOPs ratio, TTFT, tokens/s and timings (the manifest's fields);
    times: the same timings, typed; error: why it failed."""

    path: str
    caption: str | None
    stats: dict = field(default_factory=dict)
    error: str | None = None
    skipped: str | None = None  # not captioned on purpose (another run took it): why
    times: ClipTimes | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.skipped is None



@dataclass
class CaptionSummary:
    """What a folder run did. captions: every clip that has a readable caption now
    (written this run or found), in clip order, as {path: text}. skipped: clips that
    already had a caption (unread: those whose caption is not read, and why);
    others: clips another run at the same time took; folders: subfolders left out."""

    found: int = 0
    done: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: list = field(default_factory=list)  # (path, reason)
    captions: dict = field(default_factory=dict)
    model_error: str | None = None
    seconds: float = 0.0
    model_seconds: float = 0.0
    unread: list = field(default_factory=list)  # (path, why)
    others: list = field(default_factory=list)
    folders: list = field(default_factory=list)  # (path, why)
    write_error: str | None = None
    manifest: str | None = None
    batch_size: int = 1  # clips decoded together (the number auto chose, when auto)

    @property
    def clips_per_minute(self) -> float:
        return 60.0 * len(self.done) / self.seconds if self.seconds > 0 else 0.0

    def exit_code(self) -> int:
        """0, unless the model or the disk failed (2) or no clip has a caption (1)."""
        if self.model_error or self.write_error:
            return 2
        return 0 if self.captions or self.skipped or self.done or self.others else 1

    def to_dict(self) -> dict:
        return {"found": self.found, "done": self.done, "skipped": self.skipped,
                "failed": [list(f) for f in self.failed], "captions": self.captions,
                "model_error": self.model_error, "seconds": self.seconds, "model_seconds": self.model_seconds,
                "unread": [list(f) for f in self.unread], "others": self.others,
                "folders": [list(f) for f in self.folders], "write_error": self.write_error,
                "manifest": self.manifest, "batch_size": self.batch_size}

    @classmethod
    def merge(cls, parts: Iterable[dict]) -> CaptionSummary:
        """One summary for the shards of a distributed run (wall time: the slowest shard)."""
        total = cls()
        for p in parts:
            total.found += p["found"]
            total.done += p["done"]
            total.skipped += p["skipped"]
            total.failed += [tuple(f) for f in p["failed"]]
            total.captions.update(p["captions"])
            total.model_error = total.model_error or p["model_error"]
            total.seconds = max(total.seconds, p["seconds"])
            total.model_seconds += p["model_seconds"]
            total.unread += [tuple(f) for f in p.get("unread", [])]
            total.others += p.get("others", [])
            total.folders += [tuple(f) for f in p.get("folders", []) if tuple(f) not in total.folders]
            total.write_error = total.write_error or p.get("write_error")
            total.manifest = total.manifest or p.get("manifest")
            total.batch_size = max(total.batch_size, p.get("batch_size", 1))
        total.captions = dict(sorted(total.captions.items()))
        return total

    def text(self, processes: int = 1, names: int = 3) -> str:
        """The report: counts, speed, then failures grouped by reason (how many, the
        first ``names`` names of each; every name is in the manifest)."""
        lines = [f"Captioned {len(self.done)} clip(s), skipped {len(self.skipped)} already captioned, "
                 f"failed {len(self.failed)}, of {self.found} found."]
        if self.others:
            lines.append(f"{len(self.others)} clip(s) left to another run captioning the same folder now.")
        if self.done:
            busy = self.model_seconds / (self.seconds * processes) if self.seconds > 0 else 0.0
            lines.append(f"{self.clips_per_minute:.1f} clips/min over {self.seconds:.1f} s; model busy "
                         f"{100 * busy:.0f}% of the time (the rest it waited for decoding)")
            if self.batch_size != 1:
                lines.append(f"Decoded up to {self.batch_size} clips together.")
        for title, entries in (("failed", self.failed), ("kept, not read", self.unread),
                               ("folder skipped", self.folders)):
            lines += grouped(title, entries, names)
        if any(len(v) > names for v in _groups(self.failed).values()):
            where = f"in the manifest {shown(self.manifest)}" if self.manifest else "with --manifest FILE"
            lines.append(f"  (every failed clip is listed {where})")
        if self.write_error:
            lines.append(f"Writing failed, run stopped: {self.write_error}")
        if self.model_error:
            lines.append(f"The model failed, run stopped: {self.model_error}")
        elif not (self.captions or self.skipped or self.done or self.others):
            lines.append("Nothing could be captioned.")
        return "\n".join(lines)


def _reason_key(rel: str, reason: str) -> str:
    """A failure's reason with the clip's own name taken out, so clips failing for
    the same reason group together."""
    for name in sorted({rel, Path(rel).name}, key=len, reverse=True):
        if Path(name).suffix:  # a clip's name; a folder's ("loop") could be any word of the reason
            reason = reason.replace(name, "<clip>")
    return shown(reason)


def _groups(entries) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for rel, reason in entries:
        groups.setdefault(re.sub(r"\d+(\.\d+)?", "#", _reason_key(rel, reason)), []).append(rel)
    return groups


def grouped(title: str, entries, names: int = 3) -> list[str]:
    """Summary lines for (path, reason) entries, one group per reason, largest first."""
    reasons = {}
    for rel, reason in entries:
        reasons.setdefault(re.sub(r"\d+(\.\d+)?", "#", _reason_key(rel, reason)), _reason_key(rel, reason))
    lines = []
    for key, rels in sorted(_groups(entries).items(), key=lambda kv: -len(kv[1])):
        more = f" and {len(rels) - names} more" if len(rels) > names else ""
        lines.append(f"  {title} ({len(rels)}): {reasons[key]}")
        lines.append(f"    {', '.join(shown(r) for r in rels[:names])}{more}")
    return lines



def manifest_record(path: str, result: ClipResult | None, text: str | None = None, error: str | None = None,
                    skipped: str | None = None) -> dict:
    record = name_record(path)
    if skipped is not None:
        record["skipped"] = shown(skipped)
    elif error is None:
        record["caption"] = text
        record.update(result.stats if result is not None else {})
    else:
        record["error"] = shown(error)
    return record

