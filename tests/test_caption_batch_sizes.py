"""Issue 27's check through the command line: captions of a folder at batch size 1 and at batch
size 4 (five clips: rows leave and the fifth joins) are the same caption for every clip, with
Qwen2.5-VL's repetition penalty of 1.05, greedy and with seeded sampling, on the tiny dense
(LLaVA-OneVision) and the tiny hybrid (Qwen3.5: linear-attention states per row) models."""

from __future__ import annotations

import json

import pytest

from adatp_core.cli import main as cli_main
from adatp_core.models.tiny_qwen import ensure_tiny_qwen3_5
from adatp_core.samples import scene_frames, write_video

MODELS = {"dense": "adatp-tiny", "hybrid": "adatp-tiny-qwen3.5"}
SETTINGS = {"penalty 1.05": ["--greedy", "--repetition-penalty", "1.05"],
            "sampled, seeded": ["--do-sample", "--seed", "11", "--temperature", "1.3", "--top-k", "40",
                                "--repetition-penalty", "1.05"]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-sizes")
    for i, n in enumerate([3, 5, 2, 4, 6]):
        write_video(root / f"clip{i}.mp4", scene_frames(n, 64 + 16 * i, 48 + 8 * i, scenes=2), fps=4.0)
    return root


@pytest.fixture(scope="module")
def cache_dir(tiny_dir):
    ensure_tiny_qwen3_5(tiny_dir.parent)  # beside the session's tiny LLaVA-OneVision
    return tiny_dir.parent


def captions(folder, out, model, batch_size, settings, capsys) -> dict:
    manifest = out / "captions.jsonl"
    code = cli_main(["caption", str(folder), "--model", model, "--out", str(out), "--manifest", str(manifest),
                     "--frames", "2", "--max-new-tokens", "8", "--workers", "0", "--device", "cpu",
                     "--batch-size", str(batch_size), *settings])
    capsys.readouterr()
    assert code == 0
    records = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    assert all(r.get("error") in (None, "") for r in records), records
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(out.glob("*.txt"))}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_the_cli_captions_each_clip_alike_at_batch_1_and_4(folder, cache_dir, tmp_path, monkeypatch, capsys,
                                                          model, setting):
    monkeypatch.setenv("ADATP_CACHE_DIR", str(cache_dir))
    one = captions(folder, tmp_path / "b1", MODELS[model], 1, SETTINGS[setting], capsys)
    four = captions(folder, tmp_path / "b4", MODELS[model], 4, SETTINGS[setting], capsys)
    assert len(one) == 5 and four == one
    assert len(set(one.values())) > 1  # the clips really differ
