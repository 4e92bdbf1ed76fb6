"""The stream of clips through the model: decoding ahead, then one result per clip, in order.

``caption_videos`` takes a model, the AdaTP settings and a caption prompt and
yields one ``ClipResult`` per clip, in order: the caption and its stats, or the
error. Frames for the next clips are decoded meanwhile in a small pool of
worker processes (decord itself runs one level further down, in decode_worker),
so the model waits for decoding only when the decoder cannot keep up. With a
batch size other than 1, clips are prefilled one at a time and decoded together
(batching.py), and still come out in clip order.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace

from ..batching import check_batch_size, decode_together
from ..budget import check_memory
from ..decode_worker import watch_parent_process
from ..errors import AdaTPInputError, AdaTPTransformersError
from ..fits import check_question
from ..memory import release_pinned
from ..pipeline import PipelineConfig, check_config, check_fits, check_option, prefill, run_pipeline
from ..places import Places
from ..timing import DecodeStats
from ..video import SamplePlan, decode_plan, frames_to_image, plan_sampling
from .summary import ClipResult, ClipTimes

log = logging.getLogger(__package__)  # "adatp_core.caption", the name the one-module caption.py logged under

DEFAULT_PROMPT = ("Describe this video in detail: the setting, every object and person, what moves and how, "
                  "and the order in which things happen.")
MAX_WORKERS = 16


class DecodeAhead:
    """Decodes ``paths`` in order, up to ``depth`` clips ahead of the consumer, in
    ``workers`` processes (0: in the consumer's process, when asked for).

    processes False runs the workers as threads: decord still decodes in its own
    child process (decode_worker.py), and a host application whose main script
    must not be re-imported by spawned workers (ComfyUI's main.py) stays safe.
    Iterating yields (path, get) with get() -> (frames uint8 [T, H, W, 3], info),
    raising the clip's error; get(checked=True) -> (frames, info, what the check returned: caption_videos'
    FitCheck, whose places the clip's prefill takes). A worker that dies (a decoder crash, in the probe or
    the decoding) fails only the clip it was working on; the pool is restarted.
    Each clip is probed in a worker, which returns its sampling plan; the plan is
    checked in this process (check(plan) raises to fail the clip undecoded;
    default: its frames must fit in the host's memory; caption_videos also checks
    the model's context and input), and only then decoded, in a worker again.
    """

    def __init__(self, paths: Iterable, cfg: PipelineConfig, workers: int = 2, depth: int | None = None,
                 processes: bool = True, check: Callable[[SamplePlan], object] | None = None):
        _check_workers(workers)
        self.paths = [str(p) for p in paths]
        # Plain arguments: a worker process then imports video.py alone (no torch).
        self.args = (cfg.num_frames, cfg.sampling, cfg.fps, cfg.start_time, cfg.end_time)
        self.check = check or (lambda plan: check_memory(plan.memory(), plan.name))
        self.workers = workers
        self.processes = processes
        self.depth = max(1, depth if depth is not None else workers + 1)
        self.pool = None
        self.pending: deque[_Ahead] = deque()

    def _start_pool(self) -> None:
        if self.processes:  # spawn: never fork a process that holds a model and torch's threads
            # Each worker ends when this process ends, however it ends (SIGKILL included).
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=watch_parent_process)
        else:
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="adatp-decode")

    def _submit(self, path: str) -> None:
        self.pending.append(_Ahead(path, self.pool.submit(plan_sampling, path, *self.args)))

    def _decode_ready(self) -> None:
        """Every clip whose probe came back is checked here and, when it passes, sent to decode:
        decoding goes on ahead of the consumer as before the check existed."""
        for entry in self.pending:
            if (entry.decoding is None and entry.planned.done()
                    and not isinstance(entry.planned.exception(), BrokenProcessPool)):  # _result restarts the pool
                self._start_decoding(entry)

    def _start_decoding(self, entry: _Ahead) -> None:
        """Check the clip's plan and send it to decode; a plan that fails the check (or a probe that
        raised) leaves its error in ``entry.decoding``, for get() to raise."""
        try:
            plan = entry.planned.result()
            entry.checked = self.check(plan)
        except BrokenProcessPool:
            raise
        except AdaTPTransformersError:  # the model failing, not the clip: the run stops
            raise
        except Exception as exc:  # noqa: BLE001  the probe's or the check's error fails this clip only
            entry.decoding = Future()
            entry.decoding.set_exception(exc)
        else:
            entry.decoding = self.pool.submit(decode_plan, plan)

    def __enter__(self):
        if self.workers:
            self._start_pool()
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        self.pending.clear()

    def _inline(self, path: str, checked: bool = False):
        plan = plan_sampling(path, *self.args)
        check = self.check(plan)
        frames, info = decode_plan(plan)
        return (frames, info, check) if checked else (frames, info)

    def __iter__(self) -> Iterator[tuple[str, Callable]]:
        if not self.workers:
            for path in self.paths:
                yield path, (lambda p=path, checked=False: self._inline(p, checked))
            return
        queue = deque(self.paths)
        while queue or self.pending:
            while queue and len(self.pending) < self.depth:
                self._submit(queue.popleft())
            self._decode_ready()
            entry = self.pending.popleft()
            yield entry.path, lambda e=entry, checked=False: self._result(e, checked)

    def _result(self, entry: _Ahead, checked: bool = False):
        try:
            if entry.decoding is None:  # its probe is still running: wait for it here
                entry.planned.result()
                self._start_decoding(entry)
            frames, info = entry.decoding.result()
            return (frames, info, entry.checked) if checked else (frames, info)
        except BrokenProcessPool as exc:
            # Every queued clip shared the dead pool: probe and decode them again in a new one.
            redo = [e.path for e in self.pending]
            self.pending.clear()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self._start_pool()
            for p in redo:
                self._submit(p)
            raise AdaTPInputError("the decoder process died on this clip (a decoder crash); "
                                  "re-export it as MP4 (H.264).") from exc
        finally:
            if self.pool is not None and self.pending:
                self._decode_ready()


@dataclass
class _Ahead:
    """One clip in DecodeAhead: its probe in a worker (planned: a SamplePlan), then, once checked
    here, its decoding in a worker (None until then)."""

    path: str
    planned: Future
    decoding: Future | None = None
    checked: object = None  # what the check returned (caption_videos': a FitCheck)


def fits_check(model, prompt: str, cfg: PipelineConfig) -> Callable[[SamplePlan], dict]:
    """DecodeAhead's check: a clip whose plan cannot fit the model's context or memory fails
    before it is decoded (pipeline.check_fits: the run's K, retention and chunks; its frames come
    decoded as one IMAGE; its keys and values on the device: rows decoded together never leave it)."""
    return lambda plan: check_fits(model, plan, [prompt], replace(cfg, kv="device"), streamed=False)


def checked_places(fit, batched: bool) -> Places | None:
    """The places a clip's prefill takes from its check (``fits_check``'s FitCheck; None where no check
    returned one), so that the prefill does not decide them again by an estimate that can disagree. Rows
    decoded together keep the check's keys and values on the device; one clip at a time, its answer places
    them knowing the kept tokens (``Places.kv`` None), where auto may still answer again with them on the
    host."""
    places = getattr(fit, "places", None)
    return places if places is None or batched else replace(places, kv=None)


def clip_stats(stats: dict) -> dict:
    """The figures a caption run reports per clip, from a pipeline's stats (with, for a clip
    that decoded only in part, how many of its frames are their own and which are not)."""
    decoding = DecodeStats.from_dict(stats)
    ms = decoding.ms_per_token
    return {
        "tokens_kept": stats["tokens_kept"], "tokens_total": stats["tokens_total"],
        "flops_ratio": round(stats["flops_ratio"], 6),
        "ttft_s": round(stats.get("time_to_first_token", 0.0), 4),
        "tokens_per_s": round(1000.0 / ms, 2) if ms else None,
        "new_tokens": decoding.new_tokens,
        **{key: stats[key] for key in ("frames_own_time", "frames_substituted")
           if stats.get("frames_substituted")},
    }


def _check_workers(workers) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= MAX_WORKERS:
        raise AdaTPInputError(f"decode workers must be an integer from 0 to {MAX_WORKERS}, got {workers!r}")


def _check_prompt(prompt) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise AdaTPInputError(f"the caption prompt is empty; write an instruction such as {DEFAULT_PROMPT!r}.")
    check_question(prompt)


def check_options(prompt: str, cfg: PipelineConfig, workers: int | None = None) -> None:
    """Every setting that can be checked without the model, so a bad one stops the run
    before the model loads. Raises OptionError naming the setting."""
    check_option("prompt", _check_prompt, prompt)
    check_config(cfg)
    if workers is not None:
        check_option("workers", _check_workers, workers)


def check_settings(model, prompt: str, cfg: PipelineConfig) -> None:
    """Settings that would fail every clip fail once, before any clip is decoded."""
    check_options(prompt, cfg)
    check_option("layer", model.adapter.resolve_layer, int(cfg.layer))


def caption_videos(model, videos: Iterable, prompt: str = DEFAULT_PROMPT, cfg: PipelineConfig | None = None,
                   workers: int = 2, processes: bool = True,
                   claim: Callable[[str], str | None] | None = None, batch_size: int = 1,
                   on_step: Callable[[], None] | None = None) -> Iterator[ClipResult]:
    """Caption each video in ``videos`` (paths) with ``run_pipeline``; one result per clip, in order.

    A clip that cannot be used (corrupt, empty, too short: AdaTPInputError) gives
    a result with ``error`` set; any other exception is the model failing and
    ends the iteration by propagating. Stats also hold ``time_wait`` (the model
    waiting for frames) and ``time_model``. workers, processes: see DecodeAhead.
    claim(path), when given, runs just before a decoded clip goes to the model: it
    returns None to go on, or why the clip is left alone (a ``skipped`` result);
    an AdaTPInputError from it fails that clip.
    batch_size: clips decoded together (batching.py; 0: auto). on_step() runs
    between decode steps and may raise (Cancel).
    """
    # Each clip is seen once: keeping its video prefix for a next question would only take memory.
    cfg = replace(cfg or PipelineConfig(), reuse_prefix=False)
    check_settings(model, prompt, cfg)
    moved = model.adapter.resolve_layer(int(cfg.layer))[1]
    if moved:  # a hybrid model: said once for the run (each clip's stats say it too)
        log.warning("layer: %s", moved)
    if check_batch_size(batch_size) != 1:
        yield from _caption_together(model, videos, prompt, cfg, workers, processes, claim, batch_size, on_step)
        return
    with DecodeAhead(videos, cfg, workers, processes=processes, check=fits_check(model, prompt, cfg)) as ahead:
        for path, get in ahead:
            wait_start = time.perf_counter()
            try:
                frames, info, fit = _decoded(get)
            except AdaTPInputError as exc:
                yield ClipResult(path, None, error=str(exc))
                continue
            left = _claimed(claim, path)
            if left is not None:
                yield left
                continue
            model_start = time.perf_counter()
            try:
                result = run_pipeline(model, frames_to_image(frames), prompt, cfg, video_info=info,
                                      places=checked_places(fit, batched=False))
            except AdaTPInputError as exc:  # e.g. a clip too long for the model's context
                yield ClipResult(path, None, error=str(exc))
                continue
            done = time.perf_counter()
            times = ClipTimes(wait=model_start - wait_start, model=done - model_start)
            yield ClipResult(path, result.answer.text.strip(), {**clip_stats(result.stats), **times.as_dict()},
                             times=times)


def _decoded(get):
    """A DecodeAhead clip's (frames, info, what its check returned). Whatever stops its decoding raises AdaTPInputError, which
    fails that clip only; the model failing in the check (AdaTPTransformersError) stops the run."""
    try:
        return get(checked=True)
    except (AdaTPInputError, AdaTPTransformersError):
        raise
    except Exception as exc:  # noqa: BLE001  a decoder's own error, of any type
        raise AdaTPInputError(f"{exc.__class__.__name__}: {exc}") from exc


def _claimed(claim, path) -> ClipResult | None:
    """None when ``claim`` (caption_videos) lets the clip go to the model; else its result."""
    if claim is None:
        return None
    try:
        why = claim(path)
    except AdaTPInputError as exc:
        return ClipResult(path, None, error=str(exc))
    return None if why is None else ClipResult(path, None, skipped=why)


def _caption_together(model, videos, prompt, cfg, workers, processes, claim, batch_size,
                      on_step) -> Iterator[ClipResult]:
    """caption_videos with clips decoded together: each clip prefilled alone, then joining the batch.
    A clip is claimed when the batch takes it in (before its frames are waited for)."""
    times: dict[str, tuple[float, float]] = {}  # path: (waited for frames, prefill seconds)
    order: deque[str] = deque()  # clips taken in, not yet yielded
    ready: dict[str, ClipResult] = {}  # finished out of order, or left alone at their claim

    def clips(ahead):
        for path, get in ahead:
            order.append(path)
            left = _claimed(claim, path)
            if left is not None:
                ready[path] = left
                continue
            yield path, lambda path=path, get=get: prefill_clip(path, get)

    def prefill_clip(path, get):
        wait_start = time.perf_counter()
        frames, info, fit = _decoded(get)
        model_start = time.perf_counter()
        state = prefill(model, frames_to_image(frames), prompt, cfg, video_info=info,
                        places=checked_places(fit, batched=True))
        times[path] = (model_start - wait_start, time.perf_counter() - model_start)
        return state

    def result(done) -> ClipResult:
        if done.error is not None:
            times.pop(done.key, None)
            return ClipResult(done.key, None, error=done.error)
        wait, seconds = times.pop(done.key)
        decoding = done.answer.decoding
        clip = ClipTimes(wait=wait, model=seconds + decoding.decode_share, batch_size=decoding.batch_size)
        return ClipResult(done.key, done.answer.text.strip(), {**clip_stats(done.answer.stats), **clip.as_dict()},
                          times=clip)

    def in_order():
        while order and order[0] in ready:
            yield ready.pop(order.popleft())

    # Results go out in clip order, as at batch 1: a clip that finishes early waits for the
    # clips before it (at most a batch's worth). If the run stops (Cancel, a model failure),
    # the finished ones still go out first, to be written (and their claims released).
    # A clip that left the batch took its pinned host buffers (rows placed on the host) with it: torch's
    # caching host allocator keeps their blocks unless given back (memory.release_pinned), as at batch 1.
    with DecodeAhead(videos, cfg, workers, processes=processes, check=fits_check(model, prompt, cfg)) as ahead:
        try:
            for done in decode_together(model, cfg.generation, clips(ahead), batch_size, on_step):
                ready[done.key] = result(done)
                del done
                release_pinned()
                yield from in_order()
            yield from in_order()
        except (Exception, KeyboardInterrupt):
            for path in order:
                if path in ready:
                    yield ready.pop(path)
            raise
        finally:
            release_pinned()

