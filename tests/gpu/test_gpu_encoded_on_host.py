"""Issue 30, where only a GPU can show it: the encoded visual rows and DeepStack's wait on the host
(pinned), come to the device a prefill call's span at a time, and the answer is the one with them on
the device, at a lower peak of allocated device memory (places.plan_places). The CPU side of this is
tests/test_encoded_on_host.py. Skips without CUDA; on a GPU machine:
python -m pytest -p no:cacheprovider tests/gpu/test_gpu_encoded_on_host.py -s
"""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTION

from adatp_core.attention import extract_attention
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.models.loader import load_video_llm
from adatp_core.models.tiny_qwen import ensure_tiny_qwen3_vl
from adatp_core.pipeline import PipelineConfig, select
from adatp_core.samples import scene_frames

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CHUNK = 256


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """The tiny Qwen3-VL (DeepStack: 3 rows a visual token) on the GPU, float32."""
    return load_video_llm(ensure_tiny_qwen3_vl(tmp_path_factory.mktemp("gpu-qwen3")), device="cuda", dtype="float32")


def test_rows_on_the_host_give_the_device_answer_at_a_lower_peak(qwen3):
    """64 frames (about 2,000 visual tokens), the prefill in calls of 256 tokens: the peak allocated over
    the encode, the prefill and the answer, above what was allocated before, with the rows on the host
    against on the device; the rows (and DeepStack's) saved should show nearly whole."""
    frames = torch.from_numpy(scene_frames(num_frames=64, width=280, height=224, scenes=3)).float() / 255
    answers, peaks = {}, {}
    for place in ("device", "host"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        state = extract_attention(qwen3, frames, QUESTION, layer=2, reuse_prefix=False, prefill_chunk=CHUNK,
                                  encoded=place)
        assert state.stats["encoded_on"] == ("host" if place == "host" else "cuda:0")
        assert state.stats["encoded_reason"] == "asked for"
        pruned = select(state, PipelineConfig(retention=0.25))
        if place == "host":  # layers >= K's DeepStack rows wait for the answer's gather, pinned, as do the kept ones
            assert state.injections[2].device.type == "cpu" and state.injections[2].is_pinned()
            kept = pruned.kept_injection()
            assert kept.features[2].is_pinned() and kept.rows.device.type == "cuda"
        answers[place] = generate_answer(pruned,
                                         SamplingConfig(max_new_tokens=6, ignore_eos=True, decode_mode="default"),
                                         return_logits=True)
        torch.cuda.synchronize()
        peaks[place] = torch.cuda.max_memory_allocated() - before
        n, d = state.num_visual, qwen3.adapter.text_model.config.hidden_size
        del state
    rows = n * d * 4 * 4  # float32 rows and 3 DeepStack rows each
    print(f"\npeak allocated above the loaded model: rows on the device {peaks['device'] / 2**20:.2f} MiB, "
          f"on the host {peaks['host'] / 2**20:.2f} MiB; the rows {rows / 2**20:.2f} MiB ({n} visual tokens)")
    assert answers["host"].token_ids == answers["device"].token_ids
    assert (answers["host"].logits - answers["device"].logits).abs().max().item() < 1e-5
    assert peaks["device"] - peaks["host"] >= rows // 2
