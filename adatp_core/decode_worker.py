"""decord in a child process: a decoder crash (decord can abort the whole process
on broken input) then costs a fallback to PyAV, never the caller.

Run as ``python decode_worker.py REQUEST_JSON``; standalone on purpose (no
package imports), so it starts fast and from any install layout.

Request: {"path", "width", "height", "times" (seconds from the first frame),
"start_time" (pts of the first frame)}.
Reply on stdout: one JSON header line {"count", "height", "width",
"timestamps"}, then ``count`` frames of height*width*3 uint8 bytes each, written
one at a time so the caller can report progress and stop early. Failures go to
stderr with exit status 3.
"""

import json
import sys

EPS = 1e-6


def main(argv) -> int:
    request = json.loads(argv[1])
    import numpy as np

    try:
        import decord
    except ImportError as exc:
        print(f"decord is not installed: {exc}", file=sys.stderr)
        return 3
    try:
        reader = decord.VideoReader(request["path"], ctx=decord.cpu(0),
                                    width=request["width"], height=request["height"])
        n = len(reader)
        if n == 0:
            print("no decodable frames", file=sys.stderr)
            return 3
        starts = reader.get_frame_timestamp(np.arange(n))[:, 0] - request["start_time"]
        targets = np.asarray(request["times"], dtype=np.float64) + EPS
        idx = np.clip(np.searchsorted(starts, targets, side="right") - 1, 0, n - 1).tolist()
        out = sys.stdout.buffer
        for k, i in enumerate(idx):
            frame = np.ascontiguousarray(reader[i].asnumpy(), dtype=np.uint8)
            if k == 0:
                header = {"count": len(idx), "height": frame.shape[0], "width": frame.shape[1],
                          "timestamps": [float(starts[j]) for j in idx]}
                out.write(json.dumps(header).encode() + b"\n")
            out.write(frame.tobytes())
            out.flush()
    except (RuntimeError, ValueError, IndexError, OSError) as exc:  # decord raises DECORDError(RuntimeError)
        print(f"{exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
