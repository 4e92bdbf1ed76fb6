#!/usr/bin/env python3
"""Memory and time of AdaTP Sample Video against Get Video Components on one VIDEO. Not a test.

    python bench/sample_video.py --seconds 20 --width 1280 --height 720 --fps 30 --frames 32

Writes a clip of that shape (H.264, PyAV), then in a fresh process each:
- components: what Get Video Components does before any frames reach the pack
  (every frame decoded into a float tensor; ComfyUI's VideoFromFile when
  ADATP_COMFYUI points to a ComfyUI checkout, else the runner's stand-in);
- sample: AdaTP Sample Video on the same file-backed VIDEO (only the sampled frames).
Prints wall time and the process's peak resident memory (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1] + "/scripts")
from run_workflow import load_pack
import importlib
pack = load_pack()
headless = importlib.import_module("ComfyUI-AdaTP.nodes.headless")
video_cls = headless.VideoFromFile
if os.environ.get("ADATP_COMFYUI"):
    sys.path.insert(0, os.environ["ADATP_COMFYUI"])
    from comfy_api.input_impl import VideoFromFile as video_cls
video = video_cls(sys.argv[2])
start = time.perf_counter()
if sys.argv[3] == "components":
    frames = video.get_components().images
else:
    frames = pack.NODE_CLASS_MAPPINGS["AdaTP_SampleVideo"]().sample(video, int(sys.argv[4]), "uniform", 1.0, 0.0, 0.0)[0]
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "frames": list(frames.shape),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--frames", type=int, default=32, help="Sample Video's num_frames")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from adatp_core.samples import write_video

    n = int(args.seconds * args.fps)
    with tempfile.TemporaryDirectory() as tmp:
        frames = np.zeros((n, args.height, args.width, 3), dtype=np.uint8)
        frames[..., 0] = (np.arange(n) * 255 // max(n - 1, 1))[:, None, None]
        path = write_video(Path(tmp) / "clip.mp4", frames, fps=args.fps)
        del frames
        print(f"clip: {n} frames of {args.width}x{args.height} at {args.fps:g} fps ({path.stat().st_size / 1e6:.1f} MB)")
        for mode in ("components", "sample"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(path), mode, str(args.frames)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{mode}: failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{mode:10s} frames {r['frames']}: {r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
