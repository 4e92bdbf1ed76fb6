"""Captions take the placements of the check before decoding (issue 30): a clip's prefill used to decide
where its encoded rows and layer K's rows live again, by its own estimate, which can disagree with the
check that let the clip through. One clip at a time, the answer still places its keys and values (knowing
the kept tokens); rows decoded together keep the check's, on the device."""

from __future__ import annotations

from dataclasses import replace

import pytest

from adatp_core import attention, pipeline
from adatp_core.caption import stream
from adatp_core.generate import SamplingConfig
from adatp_core.places import Place
from adatp_core.samples import scene_frames, write_video

CHECKED = "the check before decoding put them there"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption-places")
    return [write_video(root / f"clip{i}.mp4", scene_frames(n, 64, 48, scenes=2), fps=4.0)
            for i, n in enumerate([3, 4])]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_each_clip_is_prefilled_where_its_check_placed_it(tiny, clips, monkeypatch, batch_size):
    real_check, real_extract = stream.check_fits, attention.extract_attention
    checked, seen = [], []

    def check(model, plan, questions, cfg, streamed):
        fit = real_check(model, plan, questions, cfg, streamed)
        assert cfg.kv == "device"  # rows decoded together never leave it
        places = replace(fit.places, encoded=Place(True, CHECKED, auto=True), rows=Place(True, CHECKED, auto=True))
        checked.append(places)
        return replace(fit, places=places)

    def extract(*args, places=None, **kwargs):
        seen.append(places)
        return real_extract(*args, places=places, **kwargs)

    monkeypatch.setattr(stream, "check_fits", check)
    monkeypatch.setattr(pipeline, "extract_attention", extract)
    cfg = pipeline.PipelineConfig(num_frames=2, generation=SamplingConfig(max_new_tokens=2, ignore_eos=True))
    results = list(stream.caption_videos(tiny, clips, "Describe.", cfg, workers=0, batch_size=batch_size))
    assert [r.error for r in results] == [None, None] and len(checked) == len(seen) == 2
    for check_places, used in zip(checked, seen):
        assert used is not None and used.encoded == check_places.encoded and used.rows == check_places.rows
        # batched: the check's keys and values on the device; one at a time: the answer places them
        assert used.kv == (check_places.kv if batch_size > 1 else None)
