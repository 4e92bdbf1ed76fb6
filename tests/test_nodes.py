"""The ComfyUI node contract, and the nodes run as ComfyUI would run them."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from pack import ROOT, load_pack, pack_module

# The pack's file format: node keys, input names and their order (saved
# workflows store widget values by position). Never change these.
CONTRACT = {
    "AdaTP_LoadVideoLLM": ["model", "dtype", "attention", "device", "keep_loaded"],
    "AdaTP_LoadVideo": ["video", "num_frames", "sampling", "fps", "start_time", "end_time"],
    "AdaTP_ExtractAttention": ["model", "frames", "question", "layer", "query"],
    "AdaTP_GlobalDebias": ["state", "segment_threshold", "relevance_boost"],
    "AdaTP_LocalDebias": ["state", "max_per_position"],
    "AdaTP_PruneTokens": ["state", "retention"],
    "AdaTP_GenerateAnswer": ["state", "max_new_tokens", "do_sample", "temperature", "top_p", "seed"],
    "AdaTP_PreviewTokens": ["state", "frames"],
    "AdaTP_CaptionFolder": ["model", "folder", "prompt", "prefix", "suffix", "overwrite", "recursive", "frames",
                            "retention", "layer"],
    "AdaTP_SelfCheck": ["device", "dtype"],
    "AdaTP_SampleVideo": ["video", "num_frames", "sampling", "fps", "start_time", "end_time"],
    "AdaTP_FrameTimes": ["frames", "fps"],
    "AdaTP_ClipDataset": ["model", "sources", "output", "prompt", "prefix", "min_seconds", "max_seconds", "fps",
                          "frames"],
    "AdaTP_ExtractAttentionVideo": ["model", "video", "question", "layer", "query", "num_frames", "sampling", "fps",
                                    "start_time", "end_time"],
}
RETURNS = {
    "AdaTP_LoadVideoLLM": ("ADATP_MODEL",), "AdaTP_LoadVideo": ("IMAGE", "ADATP_VIDEO_INFO"),
    "AdaTP_ExtractAttention": ("ADATP_STATE",), "AdaTP_GlobalDebias": ("ADATP_STATE",),
    "AdaTP_LocalDebias": ("ADATP_STATE",), "AdaTP_PruneTokens": ("ADATP_STATE", "STRING"),
    "AdaTP_GenerateAnswer": ("STRING", "STRING"), "AdaTP_PreviewTokens": ("IMAGE",),
    "AdaTP_CaptionFolder": ("STRING", "STRING"), "AdaTP_SelfCheck": ("STRING",),
    "AdaTP_CaptionFolder": ("STRING", "STRING"), "AdaTP_SampleVideo": ("IMAGE", "ADATP_VIDEO_INFO"),
    "AdaTP_FrameTimes": ("ADATP_VIDEO_INFO",), "AdaTP_ClipDataset": ("STRING",),
    "AdaTP_FrameTimes": ("ADATP_VIDEO_INFO",), "AdaTP_ExtractAttentionVideo": ("ADATP_STATE", "ADATP_VIDEO_INFO"),
}
DEFAULTS = {("AdaTP_LoadVideo", "num_frames"): 32, ("AdaTP_SampleVideo", "num_frames"): 32, ("AdaTP_ExtractAttention", "layer"): 2,
            ("AdaTP_GlobalDebias", "segment_threshold"): 0.95, ("AdaTP_GlobalDebias", "relevance_boost"): 1.0,
            ("AdaTP_LocalDebias", "max_per_position"): 1, ("AdaTP_PruneTokens", "retention"): 0.25}


@pytest.fixture(scope="module")
def pack(tiny_dir):
    os.environ["ADATP_CACHE_DIR"] = str(tiny_dir.parent)  # the built-in model is already built there
    return load_pack()


def test_mappings_and_contract(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == set(CONTRACT)
    assert pack.WEB_DIRECTORY == "./web" and (ROOT / "web").is_dir()
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}
        assert list(spec["required"]) == CONTRACT[key], key
        assert cls.RETURN_TYPES == RETURNS[key]
        assert len(getattr(cls, "RETURN_NAMES", ())) == len(cls.RETURN_TYPES)
        assert callable(getattr(cls, cls.FUNCTION))
        assert cls.CATEGORY == "AdaTP" and len(cls.DESCRIPTION) > 40
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[key].startswith("AdaTP ")
        for name, (kind, *opts) in spec["required"].items():
            assert opts and opts[0].get("tooltip"), f"{key}.{name} has no tooltip"
            if (key, name) in DEFAULTS:
                assert opts[0]["default"] == DEFAULTS[(key, name)]


def test_pack_imports_beside_comfyuis_own_nodes_module(tmp_path):
    """ComfyUI has a top-level module called nodes; the pack must not need or shadow it,
    whatever its folder is called."""
    import subprocess

    code = (
        "import sys, types, importlib.util\n"
        "sys.modules['nodes'] = types.ModuleType('nodes')  # ComfyUI's own\n"
        f"spec = importlib.util.spec_from_file_location('/x/custom_nodes/comfyui-adatp_x_1', r'{ROOT / '__init__.py'}')\n"
        "m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m)\n"
        f"assert len(m.NODE_CLASS_MAPPINGS) == {len(CONTRACT)} and sys.modules['nodes'].__dict__.get('NODE_CLASS_MAPPINGS') is None\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.fixture(scope="module")
def loaded(pack):
    m = pack.NODE_CLASS_MAPPINGS
    model = m["AdaTP_LoadVideoLLM"]().load("adatp-tiny (built-in, random weights)", "float32", "sdpa", "cpu", True)[0]
    frames, info = m["AdaTP_LoadVideo"]().load("adatp_sample_video.mp4", 8, "uniform", 1.0, 0.0, 0.0)
    return model, frames, info


def test_nodes_chain_and_branch_independently(pack, loaded):
    m = pack.NODE_CLASS_MAPPINGS
    model, frames, info = loaded
    assert frames.shape[0] == 8 and frames.dtype == torch.float32 and len(info.timestamps) == 8
    state = m["AdaTP_ExtractAttention"]().extract(model, frames, "What moves?", 2, "text")[0]
    debiased = m["AdaTP_LocalDebias"]().debias(m["AdaTP_GlobalDebias"]().debias(state, 0.95, 1.0)[0], 1)[0]
    gen = m["AdaTP_GenerateAnswer"]()
    low = m["AdaTP_PruneTokens"]().prune(debiased, 0.1)
    high = m["AdaTP_PruneTokens"]().prune(debiased, 0.5)
    assert "Tokens kept: 157 of 1568" in low["result"][1] and low["ui"]["text"] == [low["result"][1]]
    args = (24, False, 1.0, 1.0, 0)
    a1, b1 = gen.generate(low["result"][0], *args), gen.generate(high["result"][0], *args)
    vanilla = gen.generate(state, *args)
    b2, a2 = gen.generate(high["result"][0], *args), gen.generate(low["result"][0], *args)
    assert a1["result"][0] == a2["result"][0] and b1["result"][0] == b2["result"][0]
    assert "Tokens kept: 1568 of 1568" in vanilla["result"][1]
    assert vanilla["ui"]["text"][0] == vanilla["result"][0]
    assert len({a1["result"][0], b1["result"][0], vanilla["result"][0]}) > 1
    assert debiased.keep is None and state.segments == ((0, 7),)  # inputs untouched


def test_preview_tokens_is_a_valid_image(pack, loaded):
    m = pack.NODE_CLASS_MAPPINGS
    model, frames, _ = loaded
    state = m["AdaTP_ExtractAttention"]().extract(model, frames, "What moves?", 2, "text")[0]
    pruned = m["AdaTP_PruneTokens"]().prune(m["AdaTP_GlobalDebias"]().debias(state, 0.95, 1.0)[0], 0.25)["result"][0]
    image = m["AdaTP_PreviewTokens"]().preview(pruned, frames)[0]
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert image.dtype == torch.float32 and 0.0 <= image.min() and image.max() <= 1.0
    unpruned = m["AdaTP_PreviewTokens"]().preview(state, frames)[0]
    assert unpruned.shape == image.shape and not torch.equal(unpruned, image)
    with pytest.raises(ValueError, match="frames"):
        m["AdaTP_PreviewTokens"]().preview(pruned, frames[:3])


def test_interrupt_stops_generation_and_next_run_works(pack, loaded):
    m = pack.NODE_CLASS_MAPPINGS
    bridge = pack_module("nodes.comfy_bridge")
    errors = pack_module("adatp_core.errors")
    model, frames, _ = loaded
    state = m["AdaTP_ExtractAttention"]().extract(model, frames, "What moves?", 2, "text")[0]
    bridge.HEADLESS.interrupt.set()
    with pytest.raises(errors.AdaTPInterrupted):
        m["AdaTP_GenerateAnswer"]().generate(state, 50, False, 1.0, 1.0, 0)
    out = m["AdaTP_GenerateAnswer"]().generate(state, 5, False, 1.0, 1.0, 0)
    assert "Generation: 5 tokens" in out["result"][1]


def test_offload_policy_moves_the_model_after_answering(pack):
    m = pack.NODE_CLASS_MAPPINGS
    model = m["AdaTP_LoadVideoLLM"]().load("adatp-tiny (built-in, random weights)", "float32", "sdpa", "cpu", False)[0]
    assert model.offload_device is not None  # keep_loaded off sets an offload device (CPU here)
    assert pack_module("adatp_core.models.loader").release(model) is False  # already there on a CPU machine


def test_model_list_has_the_builtin_and_local_folders(pack, tiny_dir, tmp_path):
    bridge = pack_module("nodes.comfy_bridge")
    saved = bridge.HEADLESS.model_dirs
    (tmp_path / "my-llava").mkdir()
    (tmp_path / "my-llava" / "config.json").write_text("{}")
    (tmp_path / "not-a-model").mkdir()
    try:
        bridge.HEADLESS.model_dirs = [tmp_path]
        models = pack.NODE_CLASS_MAPPINGS["AdaTP_LoadVideoLLM"].INPUT_TYPES()["required"]["model"][0]
        catalog = pack_module("adatp_core.models.catalog").catalog()
        builtins = [f"adatp-tiny{suffix} (built-in, random weights)" for suffix in
                    ("", "-qwen2.5-vl", "-qwen3-vl", "-qwen3.5", "-qwen3.5-moe", "-qwen3-vl-moe")]
        assert models == [*builtins, "my-llava", *(e.label for e in catalog)]
    finally:
        bridge.HEADLESS.model_dirs = saved


@pytest.mark.skipif(importlib.util.find_spec("folder_paths") is not None, reason="inside ComfyUI")
def test_bridge_degrades_without_comfyui(pack):
    bridge = pack_module("nodes.comfy_bridge")
    assert not bridge.in_comfyui()
    gpu = torch.cuda.is_available()
    assert bridge.compute_device("auto") == (torch.device("cuda", torch.cuda.current_device()) if gpu
                                             else torch.device("cpu"))  # indexed, as ComfyUI's bookkeeping needs
    bridge.Progress(3).step()  # no-op bar, no interrupt pending


def test_self_check_shows_the_doctors_table_on_the_node(pack, monkeypatch):
    """The node runs the doctor (here on the tiny LLaVA-OV only, to keep the test short)."""
    doctor = pack_module("adatp_core.doctor")
    bridge = pack_module("nodes.comfy_bridge")
    errors = pack_module("adatp_core.errors")
    llava = {"LLaVA-OV": doctor.families()["LLaVA-OV"]}
    monkeypatch.setattr(doctor, "families", lambda: llava)
    node = pack.NODE_CLASS_MAPPINGS["AdaTP_SelfCheck"]()
    bridge.HEADLESS.interrupt.set()
    with pytest.raises(errors.AdaTPInterrupted):
        node.check("cpu", "auto")
    out = node.check("cpu", "auto")
    (text,) = out["result"]
    assert out["ui"]["text"] == [text]
    assert "SDPA kernels" in text and "LLaVA-OV" in text and "no CUDA graphs on cpu" in text
    assert text.splitlines()[-1].startswith("all checks passed")
    assert pack.NODE_CLASS_MAPPINGS["AdaTP_SelfCheck"].IS_CHANGED(device="cpu", dtype="auto") != \
        pack.NODE_CLASS_MAPPINGS["AdaTP_SelfCheck"].IS_CHANGED(device="cpu", dtype="auto")  # nan: always runs


def test_generate_answers_progress_does_not_over_count_after_a_restart(pack, loaded, monkeypatch):
    """An answer that runs out of memory with its keys and values on the device by auto's choice runs again
    from step 0 (generate_answer), on_token given only the tokens it had not had; the node's bar takes its
    position from the step, so it never passes max_new_tokens (counting calls, it did)."""
    m = pack.NODE_CLASS_MAPPINGS
    bridge = pack_module("nodes.comfy_bridge")
    generate = pack_module("adatp_core.generate")
    places = pack_module("adatp_core.places")
    model, frames, _ = loaded
    state = m["AdaTP_ExtractAttention"]().extract(model, frames, "What moves?", 2, "text")[0]
    positions = []

    class Bar:  # comfy.utils.ProgressBar's interface
        def __init__(self, total):
            self.total, self.value = total, 0

        def update(self, value):
            self.value += value
            positions.append(self.value)

        def update_absolute(self, value, total=None, preview=None):
            self.value = value
            positions.append(value)

    real = generate._decode

    def decode(state, cfg, generator, on_token, return_logits, kv_on_host=False):
        if not kv_on_host:  # the answer's first two tokens, then the device runs out
            for step, token in enumerate(real(state, cfg, generator, None, return_logits).tokens[:2]):
                on_token(step, token)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(state, cfg, generator, on_token, return_logits, kv_on_host)

    monkeypatch.setattr(bridge, "_ComfyProgressBar", Bar)
    monkeypatch.setattr(generate, "_decode", decode)
    monkeypatch.setattr(generate, "kv_place", lambda *a: places.Place(False, "it fitted by the estimate", auto=True))
    monkeypatch.setattr(generate, "kv_retry_place", lambda *a: places.Place(True, "room on the host"))
    out = m["AdaTP_GenerateAnswer"]().generate(state, 5, False, 1.0, 1.0, 0)
    assert "the device ran out of memory" in out["result"][1]
    assert positions == list(range(1, len(positions) + 1)) and 2 < len(positions) <= 5  # the same tokens: not again
