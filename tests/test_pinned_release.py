"""Pinned host buffers given back to the OS where they die (issue 30): torch's caching host allocator keeps
a dead pinned block for the process's life, so the encoded rows, layer K's rows and gathered DeepStack rows
a long video put on the host were held until the next answer with its keys and values there. A run that
pinned nothing (every run on one device, every CPU run) pays nothing for it.

No GPU here: pinning is faked (torch.empty with pin_memory records it and allocates plainly) and so is
torch's empty_host_cache (counted)."""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTION

from adatp_core import memory
from adatp_core.generate import SamplingConfig
from adatp_core.pipeline import PipelineConfig, run_pipeline
from adatp_core.prefix_cache import FrozenPrefix, PrefixStore


class _Calls(list):
    held: dict


@pytest.fixture
def host_cache(monkeypatch):
    """Pinning faked; returns the list of empty_host_cache calls, and the allocator's figures to set."""
    real_empty = torch.empty
    calls, held = _Calls(), {"allocated_bytes.current": 0}

    def empty(*args, pin_memory=False, **kwargs):
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.accelerator, "empty_host_cache", lambda: calls.append(1), raising=False)
    monkeypatch.setattr(torch.cuda, "host_memory_stats", lambda: dict(held))
    monkeypatch.setitem(memory._pinned, "since", False)
    calls.held = held
    return calls


def test_release_runs_only_after_something_was_pinned(host_cache):
    assert not memory.release_pinned() and host_cache == []  # nothing pinned: no collection, no call
    memory.host_buffer((4, 8), torch.float32, pin=False)
    assert not memory.release_pinned() and host_cache == []
    rows = memory.host_buffer((4, 8), torch.float32, pin=True)
    assert rows.shape == (4, 8)
    assert memory.release_pinned() and host_cache == [1]
    assert not memory.release_pinned() and host_cache == [1]  # given back, nothing left: done
    host_cache.held["allocated_bytes.current"] = 1 << 20  # a live pinned tensor (a kept prefix's rows)
    memory.host_buffer((4, 8), torch.float32, pin=True)
    assert memory.release_pinned() and memory.release_pinned() and host_cache == [1, 1, 1]  # until it dies
    host_cache.held["allocated_bytes.current"] = 0
    assert memory.release_pinned() and not memory.release_pinned() and len(host_cache) == 4


def test_a_run_and_a_dropped_prefix_give_back_what_was_pinned(tiny, frames, host_cache):
    """run_pipeline gives back the pinned blocks of what it encoded, once its frames are gone; a prefix
    store that evicts or clears a prefix (its encoded rows on the host) gives back theirs."""
    cfg = PipelineConfig(num_frames=4, encoded="host", rows="host", kv="host",
                         generation=SamplingConfig(max_new_tokens=2, ignore_eos=True))
    result = run_pipeline(tiny, frames, QUESTION, cfg)
    assert result.answer.stats["encoded_on"] == "host" and host_cache == []  # a CPU model pins nothing
    memory.host_buffer((4, 8), torch.float32, pin=True)  # as a GPU model's encoded rows are
    run_pipeline(tiny, frames, QUESTION, cfg)
    assert host_cache == [1]
    store = PrefixStore(max_entries=1)
    store.put("a", _prefix())
    memory.host_buffer((4, 8), torch.float32, pin=True)
    store.put("b", _prefix())  # "a" evicted
    assert len(store) == 1 and host_cache == [1, 1]
    memory.host_buffer((4, 8), torch.float32, pin=True)
    store.clear()
    assert len(store) == 0 and host_cache == [1, 1, 1]
    store.clear()  # nothing dropped, nothing pinned since: nothing to do
    assert host_cache == [1, 1, 1]


def _prefix() -> FrozenPrefix:
    return FrozenPrefix(None, ((torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2)),), torch.zeros(1, 4, 8))


def test_a_failed_run_gives_back_what_was_pinned(tiny, frames, host_cache, monkeypatch):
    from adatp_core import pipeline

    def fail(*args, **kwargs):
        raise RuntimeError("the answer failed")

    monkeypatch.setattr(pipeline, "generate_answer", fail)
    memory.host_buffer((4, 8), torch.float32, pin=True)  # as a GPU model's encoded rows are
    with pytest.raises(RuntimeError, match="the answer failed"):
        run_pipeline(tiny, frames, QUESTION, PipelineConfig(num_frames=4))
    assert host_cache == [1]


@pytest.mark.parametrize("batch", [1, 2])
def test_captions_give_back_what_was_pinned(tiny, tmp_path, host_cache, batch):
    """Clips captioned one at a time or decoded together give back their pinned blocks."""
    import numpy as np

    from adatp_core.caption.stream import caption_videos
    from adatp_core.samples import write_video

    paths = [str(write_video(tmp_path / f"v{i}.mp4", np.full((8, 48, 64, 3), 40 * i, dtype=np.uint8), fps=8.0))
             for i in range(2)]
    memory.host_buffer((4, 8), torch.float32, pin=True)  # as a clip's rows on the host are
    cfg = PipelineConfig(num_frames=4, generation=SamplingConfig(max_new_tokens=2))
    out = list(caption_videos(tiny, paths, cfg=cfg, workers=0, processes=False, batch_size=batch))
    assert [r.error for r in out] == [None, None] and host_cache == [1]
