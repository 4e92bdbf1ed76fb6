"""The batched Qwen vision towers equal transformers' own forward (sdpa, one call per window)."""

import pytest
import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

from adatp_core.hf.vision import padded_segments, vision_forward

# Real patch and window sizes (14 px patches, 112 px windows = 4x4 merged tokens), tiny widths.
# initializer_range 0.05 keeps outputs ~10 (float32 error ~5e-7) while attention stays peaked
# enough that a wrong window, mask or rotary position shows as >1e-3.
QWEN2_5 = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=24,
               fullatt_block_indexes=[1, 3], initializer_range=0.05)
QWEN3 = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=24,
             num_position_embeddings=36, deepstack_visual_indexes=[0, 2], initializer_range=0.05)

GRIDS = {
    "one_window": [[1, 8, 8]],
    "equal_windows": [[2, 16, 16]],
    "unequal_windows": [[3, 10, 14]],
    "single_merge_unit": [[1, 2, 2]],
    "narrow": [[1, 18, 4]],
    "equal_windows_unequal_frames": [[1, 8, 8], [2, 16, 16]],
    "mixed": [[2, 10, 14], [1, 16, 8], [1, 2, 6], [3, 6, 10]],
}


def build(kind, dtype=torch.float32):
    torch.manual_seed(0)
    if kind == "qwen2_5":
        model = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**QWEN2_5))
    else:
        model = Qwen3VLVisionModel(Qwen3VLVisionConfig(**QWEN3))
    model.set_attn_implementation("sdpa")
    return model.eval().to(dtype)


def pixels(model, grid):
    cfg = model.config
    patch = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    grid_thw = torch.tensor(grid)
    return torch.randn(int(grid_thw.prod(-1).sum()), patch), grid_thw


def outputs(result):
    """The stock output's tensors by field name (DeepStack features flattened)."""
    fields = {k: v for k, v in result.items() if k != "deepstack_features"}
    for i, t in enumerate(result.get("deepstack_features") or []):
        fields[f"deepstack_{i}"] = t
    return fields


@pytest.mark.parametrize("kind", ["qwen2_5", "qwen3"])
@pytest.mark.parametrize("grid", list(GRIDS.values()), ids=list(GRIDS))
def test_equals_stock_forward_float32(kind, grid):
    model = build(kind)
    torch.manual_seed(1)
    x, grid_thw = pixels(model, grid)
    with torch.no_grad():
        stock = model(x, grid_thw=grid_thw)
        ours = vision_forward(model, x, grid_thw)
    assert type(ours) is type(stock)
    want, got = outputs(stock), outputs(ours)
    assert set(got) == set(want)
    if kind == "qwen3":
        assert len(stock["deepstack_features"]) == 2
    for name, ref in want.items():
        assert got[name].shape == ref.shape and got[name].dtype == ref.dtype, name
        err = (got[name] - ref).abs().max().item()
        assert err <= 1e-5, (name, err)


@pytest.mark.parametrize("kind", ["qwen2_5", "qwen3"])
def test_bfloat16_within_rounding_of_stock(kind):
    grid = GRIDS["mixed"]
    ref_model = build(kind)
    model = build(kind, torch.bfloat16)
    torch.manual_seed(1)
    x, grid_thw = pixels(model, grid)
    with torch.no_grad():
        exact = ref_model(x, grid_thw=grid_thw).pooler_output
        stock = model(x, grid_thw=grid_thw).pooler_output.float()
        ours = vision_forward(model, x, grid_thw).pooler_output.float()
    assert ours.dtype == stock.dtype
    stock_err = (stock - exact).abs().max().item()
    ours_err = (ours - exact).abs().max().item()
    # Both differ from float32 by bf16 rounding; batching must not make it worse.
    assert ours_err <= 1.5 * stock_err + 1e-3 * exact.abs().max().item(), (ours_err, stock_err)


def test_padded_segments_layout():
    seg = padded_segments(torch.tensor([0, 3, 3, 7, 8], dtype=torch.int32), torch.device("cpu"))
    assert (seg.batch, seg.length) == (3, 4)  # the empty segment is dropped
    assert seg.slots.tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    assert seg.key_mask.view(3, 4).tolist() == [[True, True, True, False], [True] * 4,
                                                  [True, False, False, False]]
    equal = padded_segments(torch.tensor([0, 4, 8]), torch.device("cpu"))
    assert (equal.batch, equal.length, equal.slots, equal.key_mask) == (2, 4, None, None)


def test_rejects_other_towers():
    with pytest.raises(TypeError, match="Qwen2.5-VL, Qwen3-VL and Qwen3.5"):
        vision_forward(torch.nn.Linear(2, 2), torch.zeros(1, 2), torch.tensor([[1, 1, 1]]))


def test_benchmark_script_runs(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import vision_attention

    assert vision_attention.main(["--shape", "tiny,qwen3-tiny", "--frames", "3", "--size", "224",
                                  "--repeats", "1", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("vision_attention shape=") for line in lines)
    fields = dict(kv.split("=", 1) for kv in lines[0].split()[1:])
    assert fields["grid_thw"] == "2,16,16" and fields["attention_calls"] == "52/8"
    assert float(fields["max_abs_err"]) <= 1e-5


def test_accelerate_hooked_tower_runs_its_own_forward(monkeypatch):
    import adatp_core.hf.vision as qwen_vision

    model = build("qwen2_5")
    model.blocks[1]._hf_hook = object()  # what accelerate's dispatch leaves on offloaded modules
    calls = []
    monkeypatch.setattr(qwen_vision, "segment_attention", lambda *a: calls.append(a))
    x, grid_thw = pixels(model, GRIDS["unequal_windows"])
    with torch.no_grad():
        ours = vision_forward(model, x, grid_thw)
        del model.blocks[1]._hf_hook
        stock = model(x, grid_thw=grid_thw)
    assert not calls
    assert torch.equal(ours.pooler_output, stock.pooler_output)
