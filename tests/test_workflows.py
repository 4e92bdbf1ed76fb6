"""The shipped workflow files: they match the nodes and run headless end to end."""

from __future__ import annotations

import copy
import json
import os

import pytest
from pack import ROOT, load_pack, pack_module

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def env(tiny_dir, tmp_path_factory):
    os.environ["ADATP_CACHE_DIR"] = str(tiny_dir.parent)
    pack = load_pack()
    bridge = pack_module("nodes.comfy_bridge")
    bridge.HEADLESS.output_dir = tmp_path_factory.mktemp("out")
    return pack, pack_module("nodes.headless")


def _load(name):
    return json.loads((ROOT / "workflows" / name).read_text())


def test_the_workflows_ship():
    assert [p.name for p in WORKFLOWS] == ["adatp_video_qa.json", "caption_folder.json", "clip_dataset.json",
                                           "fastv_baseline.json",
                                           "generated_video_qa.json", "long_video_qa.json", "self_check.json", "two_questions.json",
                                           "vanilla_vs_adatp.json", "video_caption.json"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_links_match_node_definitions(env, path):
    pack, headless = env
    data = json.loads(path.read_text())
    wf = headless.Workflow(data, pack.NODE_CLASS_MAPPINGS)  # raises on any mismatch
    classes = {**headless.CORE_NODES, **pack.NODE_CLASS_MAPPINGS}
    for link_id, src, src_slot, dst, dst_slot, kind in data["links"]:
        src_node, dst_node = wf.nodes[src], wf.nodes[dst]
        assert classes[src_node["type"]].RETURN_TYPES[src_slot] == kind
        assert src_node["outputs"][src_slot]["type"] == kind and link_id in src_node["outputs"][src_slot]["links"]
        inp = dst_node["inputs"][dst_slot]
        assert inp["link"] == link_id and inp["type"] in (kind, "*")  # "*": Preview Any takes anything
    by_type = {n["type"] for n in data["nodes"]}
    if path.name == "self_check.json":  # no model to load: it builds its own tiny ones
        assert by_type == {"AdaTP_SelfCheck", "Note"}
        return
    if path.name == "caption_folder.json":
        assert {"AdaTP_LoadVideoLLM", "AdaTP_CaptionFolder", "PreviewAny"} <= by_type
    elif path.name == "clip_dataset.json":
        assert {"AdaTP_LoadVideoLLM", "AdaTP_ClipDataset"} <= by_type
    elif path.name == "long_video_qa.json":  # core Load Video's VIDEO streamed into Extract Attention (Video File)
        assert {"LoadVideo", "AdaTP_ExtractAttentionVideo", "AdaTP_GenerateAnswer"} <= by_type
    elif path.name == "generated_video_qa.json":  # core Load Video's VIDEO into Sample Video
        assert {"LoadVideo", "AdaTP_SampleVideo", "AdaTP_ExtractAttention", "AdaTP_GenerateAnswer"} <= by_type
    else:
        assert {"AdaTP_LoadVideoLLM", "AdaTP_LoadVideo", "AdaTP_ExtractAttention", "AdaTP_GenerateAnswer"} <= by_type
    loaders = [n for n in data["nodes"] if n["type"] == "AdaTP_LoadVideoLLM"]
    assert loaders[0]["widgets_values"][0] == "adatp-tiny (built-in, random weights)"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_workflow_runs_headless(env, path):
    pack, headless = env
    if path.name == "caption_folder.json":  # it writes captions: run in a fresh input directory below
        pytest.skip("run in test_caption_folder_workflow_runs_on_the_sample_folder")
    if path.name == "clip_dataset.json":  # it writes a training set: run in fresh folders below
        pytest.skip("run in test_clip_dataset_workflow_makes_a_set_from_the_sample")
    if path.name == "self_check.json":  # every tiny family: minutes on this CPU
        pytest.skip("its node runs in test_nodes.py::test_self_check_shows_the_doctors_table_on_the_node")
    result = headless.run_workflow(path, pack.NODE_CLASS_MAPPINGS, log=lambda m: None)
    texts = [t for _, t in result.texts()]
    answers = [r for nid, r in result.outputs.items()
               if json.loads(path.read_text()) and len(r) == 2 and all(isinstance(x, str) for x in r)]
    assert answers, "no Generate Answer ran"
    assert any(t.startswith("Tokens kept:") for t in texts)
    for image in result.images():
        assert open(image, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    if path.name == "vanilla_vs_adatp.json":
        stats = [t for t in texts if "Generation:" in t]
        assert len(stats) == 2
        assert any("Tokens kept: 6272 of 6272" in s for s in stats)
        assert any("Tokens kept: 1568 of 6272" in s for s in stats)
    if path.name == "generated_video_qa.json":  # Sample Video decoded the sample's frames and gave their times
        frames, info = result.outputs[3]
        assert frames.shape[0] == 32 and len(info.timestamps) == 32 and info.backend in ("decord", "pyav")
        assert any("frame times from the video" in t for t in texts)
    if path.name == "long_video_qa.json":  # streamed at 1 fps over the whole 12 s sample, times from the file
        state, info = result.outputs[3]
        assert len(info.timestamps) == 12 and state.stats["video_streamed"] and info.backend in ("decord", "pyav")
        assert any("frame times from the video" in t for t in texts)
    if path.name == "two_questions.json":  # the second Extract Attention reuses the first's video prefix
        prefix = [t.splitlines()[-1] for t in texts if "Generation:" in t]
        assert [line.split(";")[0] for line in prefix] == [
            "Video prefix: computed and kept for the next question",
            "Video prefix: reused from an earlier question (no vision, layers < K over the question only)"]
    if path.name == "video_caption.json":
        assert "Describe this video in detail" in _load(path.name)["nodes"][2]["widgets_values"][0]


def bypass_gives_fastv(pack, headless, data) -> None:
    """Run ``data`` with and without Global and Local Debias bypassed: bypassed, the keep set is FastV's."""
    import torch

    keep = {}
    for label, mode in (("adatp", 0), ("bypassed", 4)):
        wf = copy.deepcopy(data)
        for node in wf["nodes"]:
            if node["type"] in ("AdaTP_GlobalDebias", "AdaTP_LocalDebias"):
                node["mode"] = mode
        result = headless.run_workflow(wf, pack.NODE_CLASS_MAPPINGS, log=lambda m: None)
        prune_id = next(n["id"] for n in wf["nodes"] if n["type"] == "AdaTP_PruneTokens")
        keep[label] = result.outputs[prune_id][0]
    state = keep["bypassed"]
    b = state.keep.numel()
    fastv = torch.sort(torch.sort(state.scores, descending=True, stable=True).indices[:b]).values
    assert torch.equal(state.keep, fastv)
    assert not torch.equal(keep["adatp"].keep, state.keep)


def test_bypassing_both_debias_nodes_gives_fastv(env):
    """Swapping stages: bypass Global and Local Debias in the AdaTP workflow -> FastV's keep set."""
    bypass_gives_fastv(*env, _load("adatp_video_qa.json"))


def _broken(edit):
    data = _load("adatp_video_qa.json")
    edit(data)
    return data


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["nodes"][3].update(type="NoSuchNode"), r"#4 .*unknown node type 'NoSuchNode'"),
    (lambda d: d["nodes"][5]["widgets_values"].append(0.5), r"#6 .*2 widget values saved.*1 widget slots"),
    (lambda d: d["nodes"][6].update(widgets_values=d["nodes"][6]["widgets_values"][:5]),
     r"#7 .*5 widget values.*\d+ widget slots.*seed \(control\)"),
    (lambda d: d["nodes"][2]["inputs"][0].update(link=None), r"#3 .*required input 'model' is not connected"),
    (lambda d: d["nodes"][2]["inputs"][1].update(link=99), r"#3 .*link 99, which is not in the file"),
    (lambda d: d["links"].__setitem__(0, [1, 2, 0, 3, 0, "IMAGE"]), r"#3 .*wants ADATP_MODEL but is linked to IMAGE"),
])
def test_runner_names_the_broken_node(env, edit, message):
    pack, headless = env
    with pytest.raises(headless.WorkflowError, match=message):
        headless.run_workflow(_broken(edit), pack.NODE_CLASS_MAPPINGS, log=lambda m: None)


def test_api_format_conversion(env):
    pack, headless = env
    api = headless.Workflow(_load("adatp_video_qa.json"), pack.NODE_CLASS_MAPPINGS).to_api()
    assert api["3"]["class_type"] == "AdaTP_ExtractAttention"
    assert api["3"]["inputs"]["model"] == ["1", 0] and api["3"]["inputs"]["layer"] == 2
    assert api["7"]["inputs"]["seed"] == 0 and "control" not in json.dumps(api["7"])
    assert all(v["class_type"] != "Note" for v in api.values())


def test_runner_script(env, capsys):
    import run_workflow

    assert run_workflow.main([str(ROOT / "workflows" / "fastv_baseline.json"), "--set", "5.max_new_tokens=3",
                              "--output-dir", str(pack_module("nodes.comfy_bridge").HEADLESS.output_dir)]) == 0
    out = capsys.readouterr().out
    assert "Generation: 3 tokens" in out and "image: " in out
    assert run_workflow.main([str(ROOT / "README.md")]) == 2


def test_caption_folder_workflow_runs_on_the_sample_folder(env, tmp_path, monkeypatch):
    """The pack's sample folder is made in the input directory and captioned; a rerun skips it.
    (Shorter captions than shipped, for speed; scripts/check_comfyui_server.py runs it as shipped.)"""
    pack, headless = env
    bridge = pack_module("nodes.comfy_bridge")
    monkeypatch.setattr(bridge.HEADLESS, "input_dir", tmp_path)
    path = ROOT / "workflows" / "caption_folder.json"
    short = {(2, "max_new_tokens"): 16}
    result = headless.run_workflow(path, pack.NODE_CLASS_MAPPINGS, short, log=lambda m: None)
    captions, summary = result.outputs[2]
    caption = (bridge.HEADLESS.input_dir / "adatp_caption_samples" / "adatp_sample_video.txt").read_text()
    assert captions == [caption] and caption
    assert summary.startswith("Captioned 1 clip(s), skipped 0 already captioned, failed 0, of 1 found.")
    assert result.ui[3]["text"] == [json.dumps(captions)]  # Preview Any shows the list
    again = headless.run_workflow(path, pack.NODE_CLASS_MAPPINGS, short, log=lambda m: None)
    assert again.outputs[2][0] == [caption] and "skipped 1 already captioned" in again.outputs[2][1]


def test_clip_dataset_workflow_makes_a_set_from_the_sample(env, tmp_path, monkeypatch):
    """The sample video (three 4 s shots) in input/adatp_clip_samples becomes three 61-frame clips
    at 16 fps in output/adatp_clips, each captioned; a rerun does nothing. (Short captions and few
    frames per caption, for speed.)"""
    pack, headless = env
    bridge = pack_module("nodes.comfy_bridge")
    monkeypatch.setattr(bridge.HEADLESS, "input_dir", tmp_path / "input")
    monkeypatch.setattr(bridge.HEADLESS, "output_dir", tmp_path / "output")
    path = ROOT / "workflows" / "clip_dataset.json"
    short = {(2, "max_new_tokens"): 4, (2, "caption_frames"): 4}
    (summary,) = headless.run_workflow(path, pack.NODE_CLASS_MAPPINGS, short, log=lambda m: None).outputs[2]
    out = tmp_path / "output" / "adatp_clips"
    clips = sorted((out / "videos").glob("*.mp4"))
    assert "Clips: 3 planned, 3 cut now" in summary and len(clips) == 3, summary
    assert all(c.with_suffix(".txt").read_text() for c in clips)
    records = [json.loads(line) for line in (out / "clips.jsonl").read_text().splitlines()]
    assert [(r["frames"], r["fps"]) for r in records] == [(61, 16.0)] * 3
    assert len(list((out / "subtitles").glob("*.srt"))) == 1
    (again,) = headless.run_workflow(path, pack.NODE_CLASS_MAPPINGS, short, log=lambda m: None).outputs[2]
    assert "0 cut now" in again and "all up to date" in again


def _boxes(data, make_workflows, pack, headless):
    """Each node's rectangle in ComfyUI's frontend, title bar included, at its largest
    (after a run, when a text node shows its answer), from make_workflows' sizes."""
    classes = {**headless.CORE_NODES, **pack.NODE_CLASS_MAPPINGS}
    boxes = {}
    for node in data["nodes"]:
        w, h = node["size"]
        if node["type"] in classes:
            title = node.get("title") or pack.NODE_DISPLAY_NAME_MAPPINGS.get(node["type"]) \
                or make_workflows.DISPLAY_NAMES[node["type"]]
            real = make_workflows.node_size(classes[node["type"]], node["type"], title, headless, after_run=True)
            assert node["size"][0] >= make_workflows.node_size(classes[node["type"]], node["type"], title,
                                                               headless)[0]
            w, h = max(w, real[0]), max(h, real[1])
        x, y = node["pos"]
        boxes[node["id"]] = (x, y - make_workflows.TITLE_HEIGHT, x + w, y + h)
    return boxes


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_two_nodes_overlap_at_their_real_size(env, path):
    import make_workflows

    pack, headless = env
    boxes = _boxes(json.loads(path.read_text()), make_workflows, pack, headless)
    ids = sorted(boxes)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a], boxes[b]
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"{path.name}: nodes {a} and {b} overlap"


def test_node_sizes_follow_litegraph(env):
    """computeSize's arithmetic on two nodes, worked by hand."""
    import make_workflows as mw

    pack, headless = env
    local = pack.NODE_CLASS_MAPPINGS["AdaTP_LocalDebias"]
    # one socket row (state in, state out) + one widget (20 + 4) + 8 + 6 = 58 -> 60
    assert mw.node_size(local, "AdaTP_LocalDebias", "AdaTP Local Debias", headless) == [220, 60]
    answer = pack.NODE_CLASS_MAPPINGS["AdaTP_GenerateAnswer"]
    before = mw.node_size(answer, "AdaTP_GenerateAnswer", "x", headless)
    after = mw.node_size(answer, "AdaTP_GenerateAnswer", "x", headless, after_run=True)
    # 2 output rows + 9 widgets (seed's control, repetition_penalty, top_k and settings included)
    # = 40 + 9 * 24 + 8 + 6 = 270 -> 270
    assert before[1] == 270 and after[1] >= 270 + mw.MULTILINE_HEIGHT + 4 + 24 * 15 and after[0] >= 420


def test_shipped_workflows_are_what_make_workflows_writes(env):
    import make_workflows

    pack, headless = env
    for name, flow in make_workflows.WORKFLOWS.items():
        built = make_workflows.build(flow, pack.NODE_CLASS_MAPPINGS, headless, pack.NODE_DISPLAY_NAME_MAPPINGS)
        assert json.loads(json.dumps(built)) == _load(name), f"{name}: run python scripts/make_workflows.py"
