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

The child ends when its parent ends, however the parent ends (SIGKILL
included): ``end_with_parent`` polls the parent's pid from a daemon thread.
The same module gives the caption decode pool its watcher
(``watch_parent_process``), so no decoder outlives the run that started it.
"""

import json
import os
import sys
import threading
import time

EPS = 1e-6
PARENT_POLL_S = 0.2


def end_with_parent(poll: float = PARENT_POLL_S) -> None:
    """Exit this process once its parent is gone (the parent id changes when it dies:
    the process is re-parented to init or a subreaper). Portable; a daemon thread."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll)
        os._exit(3)

    threading.Thread(target=watch, name="adatp-parent-watch", daemon=True).start()


def watch_parent_process() -> None:
    """A multiprocessing worker's initializer: exit when the process that started it
    ends. Spawned children hold a sentinel that becomes ready when the parent dies;
    elsewhere (fork) the parent id is polled."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is None or getattr(parent, "sentinel", None) is None:
        end_with_parent()
        return

    def watch():
        from multiprocessing.connection import wait

        wait([parent.sentinel])
        os._exit(3)

    threading.Thread(target=watch, name="adatp-parent-watch", daemon=True).start()


def main(argv) -> int:
    end_with_parent()
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
        shape = None
        for k, i in enumerate(idx):
            frame = np.ascontiguousarray(reader[i].asnumpy(), dtype=np.uint8)
            # decord 0.6 returns (H, W, 6) for some frame widths (12, 16, 48...): rows of
            # another layout that would reach the model garbled. PyAV decodes those instead.
            if frame.ndim != 3 or frame.shape[2] != 3 or (shape is not None and frame.shape != shape):
                print(f"decord returned frames of shape {frame.shape}, not (height, width, 3)", file=sys.stderr)
                return 3
            shape = frame.shape
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
