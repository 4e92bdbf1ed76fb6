#!/usr/bin/env python3
"""Shot detection and cutting (issue 29): accuracy, speed and memory. Not a test.

    python bench/shots.py                          # accuracy set, speed, memory at 1, 5, 20 minutes
    python bench/shots.py --sd-python /tmp/venv-sd/bin/python   # + PySceneDetect on the same set

Accuracy: synthetic videos with known shot changes (adatp_core/clips/synthetic.py: textured
scenes panning under a moving disc, joined by hard cuts, dissolves and fades through black
of several lengths), and the shipped sample video (two hard cuts). A hard cut counts as found
when a detected boundary lies within +-2 frames of it, a dissolve or fade within +-0.5 s;
each detection matches one truth at most. Precision: matched detections / detections.

PySceneDetect needs OpenCV, which must not go into a ComfyUI venv beside another OpenCV
variant, so it runs in a separate interpreter (--sd-python, a venv with ``scenedetect`` and
``opencv-python-headless``) on the same files, timed there.

Speed: source seconds processed per wall-clock second on this machine, for detection and for
cutting (reencode at 16 fps 4k+1, and stream copy), at --speed-size. Memory: peak resident
memory (VmHWM) of a fresh process that detects (and one that cuts) a flat synthetic source
of each --minutes length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adatp_core.clips.synthetic import Boundary, shot_plan, write_synthetic  # noqa: E402

CUT_TOLERANCE_FRAMES = 2
GRADUAL_TOLERANCE = 0.5

SD_CHILD = r"""
import json, sys, time
import scenedetect
from scenedetect import detect, ContentDetector, AdaptiveDetector
detectors = {"content": ContentDetector, "adaptive": AdaptiveDetector}
try:
    from scenedetect import HistogramDetector
    detectors["histogram"] = HistogramDetector
except ImportError:
    pass
out = {"version": scenedetect.__version__, "runs": {}}
for name, cls in detectors.items():
    for path in sys.argv[1:]:
        start = time.perf_counter()
        scenes = detect(path, cls())
        out["runs"].setdefault(name, {})[path] = {
            "seconds": time.perf_counter() - start,
            "boundaries": [s.get_seconds() for s, _ in scenes[1:]]}
print(json.dumps(out))
"""

MEMORY_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from adatp_core.clips import ClipRules, cut_clips, detect_shots, plan_clips
path, mode = Path(sys.argv[2]), sys.argv[3]
start = time.perf_counter()
shots = detect_shots(path)
detect_s = time.perf_counter() - start
out = {"shots": len(shots), "detect_s": detect_s}
if mode == "cut":
    import tempfile
    plans = plan_clips(path, shots, ClipRules())
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        results = cut_clips(path, plans, Path(d))
        out["cut_s"] = time.perf_counter() - start
        out["clips"] = sum(r.path is not None for r in results)
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across exec on Linux)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
out["peak_mib"] = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


# (camera motion, brightness swing, transition seconds) of the accuracy videos, in turn
VARIANTS = ((1, 0.0, 0.5), (1, 0.0, 1.0), (1, 0.0, 1.5), (6, 0.0, 1.0), (12, 0.25, 0.5), (12, 0.25, 1.5))


def accuracy_set(work: Path, videos: int, shots: int, size: tuple[int, int]) -> list:
    """Synthetic videos (cached in ``work``): shots of 2 to 4 s whose transitions cycle cut,
    dissolve, fade; slow and fast camera motion, steady and swinging light, transitions of 0.5
    to 1.5 s (VARIANTS), at 24, 25 and 30 fps; a one-frame flash in every third shot."""
    truths = []
    for i in range(videos):
        motion, light, length = VARIANTS[i % len(VARIANTS)]
        plan = shot_plan(shots, 3.0, transition_seconds=length, seed=100 + i)
        starts = [sum(s for s, _, _ in plan[:k]) for k in range(len(plan))]
        flashes = tuple(starts[k] + plan[k][0] / 2 for k in range(1, len(plan), 3))  # not shot changes
        path = work / f"acc_{i}_{shots}_{size[0]}x{size[1]}_{motion}_{light}_{length}_f.mp4"
        meta = path.with_suffix(".json")
        if path.is_file() and meta.is_file():
            d = json.loads(meta.read_text())
            truths.append(dict(d, boundaries=[Boundary(**b) for b in d["boundaries"]]))
            continue
        t = write_synthetic(path, plan, width=size[0], height=size[1], seed=100 + i, fps=(24.0, 25.0, 30.0)[i % 3],
                            motion=motion, light=light, flashes=flashes)
        d = {"path": str(path), "fps": t.fps, "duration": t.duration,
             "boundaries": [b.__dict__ for b in t.boundaries]}
        meta.write_text(json.dumps(d))
        truths.append(dict(d, boundaries=list(t.boundaries)))
    return truths


def sample_truth() -> dict:
    from adatp_core.samples import sample_video

    # scene_frames(96 frames, 3 scenes) at 8 fps: cuts at frames 32 and 64
    return {"path": str(sample_video()), "fps": 8.0, "duration": 12.0,
            "boundaries": [Boundary(4.0, "cut"), Boundary(8.0, "cut")]}


def score(truths: list[dict], found: dict[str, list[float]]) -> dict:
    """Recall per kind, precision over all detections, with the tolerances above."""
    hits = {"cut": 0, "dissolve": 0, "fade": 0}
    totals = {"cut": 0, "dissolve": 0, "fade": 0}
    detections = matched = 0
    for t in truths:
        dets = sorted(found[t["path"]])
        detections += len(dets)
        used = set()
        for b in t["boundaries"]:
            totals[b.kind] += 1
            tol = CUT_TOLERANCE_FRAMES / t["fps"] + 1e-6 if b.kind == "cut" else GRADUAL_TOLERANCE
            best = min((j for j in range(len(dets)) if j not in used and abs(dets[j] - b.time) <= tol),
                       key=lambda j: abs(dets[j] - b.time), default=None)
            if best is not None:
                used.add(best)
                hits[b.kind] += 1
        matched += len(used)
    out = {f"recall_{k}": hits[k] / totals[k] for k in totals if totals[k]}
    out["precision"] = matched / detections if detections else 1.0
    out["detections"] = detections
    out["truths"] = sum(totals.values())
    return out


def run_ours(truths: list[dict], threshold: float) -> tuple[dict, float, float]:
    from adatp_core.clips import detect_shots

    found, seconds, source = {}, 0.0, 0.0
    for t in truths:
        start = time.perf_counter()
        shots = detect_shots(t["path"], threshold=threshold)
        seconds += time.perf_counter() - start
        source += t["duration"]
        found[t["path"]] = [s.start for s in shots[1:]]
    return found, seconds, source


def run_scenedetect(python: str, truths: list[dict]) -> dict:
    res = subprocess.run([python, "-c", SD_CHILD, *[t["path"] for t in truths]], capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def cut_speed(path: Path, duration: float) -> dict:
    from adatp_core.clips import ClipRules, cut_clips, detect_shots, plan_clips

    shots = detect_shots(path)
    plans = plan_clips(path, shots, ClipRules())
    out = {"clips": len(plans), "clip_seconds": sum(p.frames / p.fps for p in plans)}
    for mode in ("reencode", "copy"):
        with tempfile.TemporaryDirectory() as d:
            start = time.perf_counter()
            results = cut_clips(path, plans, Path(d), mode=mode)
            wall = time.perf_counter() - start
        out[mode] = {"wall_s": wall, "source_s_per_s": duration / wall,
                     "written": sum(r.path is not None for r in results)}
    return out


def flat_source(work: Path, minutes: float, size: tuple[int, int]) -> Path:
    """A synthetic source of ``minutes``: 8 s shots joined by cuts, dissolves and fades."""
    path = work / f"long_{minutes:g}min_{size[0]}x{size[1]}.mp4"
    if not path.is_file():
        shots = max(1, round(minutes * 60 / 8))
        tmp = path.with_name(f".{path.name}")
        write_synthetic(tmp, shot_plan(shots, 8.0, seed=7), width=size[0], height=size[1], seed=7)
        os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "adatp-bench-shots",
                   help="where the synthetic videos are written (kept for the next run)")
    p.add_argument("--videos", type=int, default=6, help="videos in the accuracy set")
    p.add_argument("--shots", type=int, default=16, help="shots per accuracy video")
    p.add_argument("--size", default="320x180", help="accuracy and memory videos' size")
    p.add_argument("--speed-size", default="1280x720", help="size of the one-minute video timed for speed")
    p.add_argument("--threshold", type=float, default=None, help="detection threshold (default: the pack's)")
    p.add_argument("--minutes", default="1,5,20", help="source lengths for the memory figures ('' to skip)")
    p.add_argument("--sd-python", default=None, help="a python with scenedetect + opencv to compare with")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    p.add_argument("--memory-only", action="store_true", help="only the memory figures (e.g. a long 720p source)")
    args = p.parse_args(argv)
    from adatp_core.clips import DEFAULT_THRESHOLD

    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    size = tuple(int(v) for v in args.size.split("x"))
    speed_size = tuple(int(v) for v in args.speed_size.split("x"))
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict = {"threshold": threshold, "size": args.size, "cpus": os.cpu_count()}

    if not args.memory_only:
        truths = accuracy_set(args.work, args.videos, args.shots, size)
        sets = {"synthetic": truths, "sample video": [sample_truth()]}
        print(f"accuracy: {len(truths)} synthetic videos x {args.shots} shots at {args.size} "
              f"(+-{CUT_TOLERANCE_FRAMES} frames for cuts, +-{GRADUAL_TOLERANCE} s for dissolves and fades)")
        print("detector | set | recall cut | recall dissolve | recall fade | precision | detections/truths | "
              "source s per s")
        rows = []
        for set_name, ts in sets.items():
            found, wall, source = run_ours(ts, threshold)
            rows.append({"detector": "adatp (PyAV)", "set": set_name, **score(ts, found),
                         "source_s_per_s": source / wall})
            if args.sd_python:
                sd = run_scenedetect(args.sd_python, ts)
                report["scenedetect_version"] = sd["version"]
                for name, runs in sd["runs"].items():
                    found = {path: r["boundaries"] for path, r in runs.items()}
                    wall = sum(r["seconds"] for r in runs.values())
                    rows.append({"detector": f"PySceneDetect {sd['version']} {name}", "set": set_name,
                                 **score(ts, found), "source_s_per_s": source / wall})
        for r in rows:
            cells = [f"{r[k]:.2f}" if k in r else "-" for k in ("recall_cut", "recall_dissolve", "recall_fade",
                                                                "precision")]
            print(f"{r['detector']} | {r['set']} | {' | '.join(cells)} | {r['detections']}/{r['truths']} | "
                  f"{r['source_s_per_s']:.1f}")
        report["accuracy"] = rows

        speed_src = flat_source(args.work, 1, speed_size)
        from adatp_core.clips import detect_shots

        start = time.perf_counter()
        detect_shots(speed_src)
        detect_wall = time.perf_counter() - start
        report["speed"] = {"size": args.speed_size, "source_s": 60.0, "detect_source_s_per_s": 60.0 / detect_wall,
                           **cut_speed(speed_src, 60.0)}
        s = report["speed"]
        print(f"\nspeed, one minute at {args.speed_size} 24 fps ({s['clips']} clips, default rules: 16 fps 4k+1 1-5 s):")
        print(f"detection {s['detect_source_s_per_s']:.1f} source s per s; cutting (reencode, libx264 crf 18) "
              f"{s['reencode']['source_s_per_s']:.1f}; cutting (copy) {s['copy']['source_s_per_s']:.1f}")
        if args.sd_python:
            sd = run_scenedetect(args.sd_python, [{"path": str(speed_src)}])
            report["speed"]["scenedetect"] = {n: 60.0 / r[str(speed_src)]["seconds"] for n, r in sd["runs"].items()}
            print("PySceneDetect: " + ", ".join(f"{n} {v:.1f}" for n, v in report["speed"]["scenedetect"].items())
                  + " source s per s")

    minutes = [float(m) for m in args.minutes.split(",") if m.strip()]
    if minutes:
        print(f"\npeak memory (fresh process, {args.size} source) | detect s | detect MiB | detect+cut MiB | clips")
        report["memory"] = []
        for m in minutes:
            src = flat_source(args.work, m, size)
            row = {"minutes": m}
            for mode in ("detect", "cut"):
                res = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(ROOT), str(src), mode],
                                     capture_output=True, text=True, check=True)
                row[mode] = json.loads(res.stdout.strip().splitlines()[-1])
            report["memory"].append(row)
            print(f"{m:g} min | {row['detect']['detect_s']:.1f} | {row['detect']['peak_mib']:.0f} | "
                  f"{row['cut']['peak_mib']:.0f} | {row['cut']['clips']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
