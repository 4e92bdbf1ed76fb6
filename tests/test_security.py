"""Issue 22: every remote-controlled input stays inside ComfyUI's folders.

One section per finding of the security review: Caption Folder confinement, playlists
through Load Video, probe-time limits (a tiny file claiming a huge duration or frame
size), the weight index, the download filter and Windows path forms. Every attack is
reproduced in-process; the real-server runs are the lead's.
"""

from __future__ import annotations

import fractions
import json
import ntpath
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from comfy_stub import make_folder_paths
from pack import ROOT, pack_module

from adatp_core import caption as cap
from adatp_core import paths
from adatp_core import video as vid
from adatp_core.errors import AdaTPInputError
from adatp_core.generate import SamplingConfig
from adatp_core.models import download as dl
from adatp_core.models.loader import ADAPTERS, check_model_folder, load_video_llm
from adatp_core.pipeline import PipelineConfig
from adatp_core.samples import scene_frames, write_video


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory) -> bytes:
    return write_video(tmp_path_factory.mktemp("clip") / "c.mp4", scene_frames(4, 64, 48, scenes=2),
                       fps=4.0).read_bytes()


@pytest.fixture
def server(tmp_path, monkeypatch, clip_bytes):
    """A ComfyUI layout (folder_paths from comfy_stub) with a dataset in input/set and,
    outside every ComfyUI folder, a secret clip whose caption holds a secret."""
    bridge = pack_module("nodes.comfy_bridge")
    fp = make_folder_paths(tmp_path / "comfy")
    monkeypatch.setattr(bridge, "folder_paths", fp)
    monkeypatch.delenv("ADATP_CAPTION_ROOTS", raising=False)
    monkeypatch.setattr(pack_module("nodes.caption_folder"), "ROOTS_FILE", tmp_path / "no_roots.txt", raising=False)
    inp = Path(fp.get_input_directory())
    (inp / "set").mkdir(parents=True)
    (inp / "set" / "a.mp4").write_bytes(clip_bytes)
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.mp4").write_bytes(clip_bytes)
    (outside / "secret.txt").write_text("SECRET")
    return fp, inp, outside


def caption_node():
    return pack_module("nodes.caption_folder").AdaTP_CaptionFolder


# ---------------------------------------------------------------------------------------
# 1. Caption Folder: only the input folder and the roots a server owner allowed
# ---------------------------------------------------------------------------------------
def test_caption_folder_refuses_paths_outside_the_input_folder(server, tmp_path):
    fp, inp, outside = server
    (inp / "out_link").symlink_to(outside, target_is_directory=True)
    node = caption_node()
    for name in [str(outside), "/", str(tmp_path / "no_such_dir"), "../../private", "out_link",
                 str(inp / "out_link"), str(inp / ".." / ".."), str(inp / "out_link" / ".." / "input")]:
        message = node.VALIDATE_INPUTS(name)
        assert message is not True and "outside" in message, name
    for name in ["~", "~/", "~root", "~no_such_user_xyz/x"]:  # user names are not probed either
        assert "'~' is not expanded" in node.VALIDATE_INPUTS(name)
    # The same answer whether an outside folder exists or not: no probing of the server's disk.
    assert (node.VALIDATE_INPUTS(str(outside)).replace(str(outside), "X")
            == node.VALIDATE_INPUTS(str(tmp_path / "nope")).replace(str(tmp_path / "nope"), "X"))
    assert str(outside) not in node.VALIDATE_INPUTS("out_link")  # a link's target is never named
    assert node.VALIDATE_INPUTS("set") is True and node.VALIDATE_INPUTS(str(inp / "set")) is True


def test_caption_folder_reads_and_writes_nothing_outside(server, tiny):
    fp, inp, outside = server
    node = caption_node()
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="outside"):
            node().caption(tiny, str(outside), "Describe.", "PWNED ", "", overwrite, True, 2, 0.25, 2,
                           max_new_tokens=2)
    assert (outside / "secret.txt").read_text() == "SECRET"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.mp4", "secret.txt"]


def test_server_owner_allows_more_roots_never_a_node_input(server, tmp_path, monkeypatch):
    fp, inp, outside = server
    node = caption_node()
    mod = pack_module("nodes.caption_folder")
    assert node.VALIDATE_INPUTS(str(outside)) is not True
    monkeypatch.setenv("ADATP_CAPTION_ROOTS", os.pathsep.join(["/", "relative/dir", str(outside)]))
    assert node.VALIDATE_INPUTS(str(outside)) is True
    assert node.VALIDATE_INPUTS("/") is not True and node.VALIDATE_INPUTS(str(tmp_path)) is not True  # "/" ignored
    monkeypatch.delenv("ADATP_CAPTION_ROOTS")
    assert node.VALIDATE_INPUTS(str(outside)) is not True
    # Or a file in the pack's folder, which no client can write.
    roots_file = tmp_path / "caption_roots.txt"
    roots_file.write_text(f"# datasets\n\n{outside}  # the private set\nrelative\n")
    monkeypatch.setattr(mod, "ROOTS_FILE", roots_file)
    assert node.VALIDATE_INPUTS(str(outside)) is True
    assert mod.root_of(mod.resolve_folder(str(outside))) == outside
    # The node's inputs are unchanged: no input names a root.
    assert "roots" not in json.dumps(node.INPUT_TYPES(), default=str).lower()


def test_clips_linked_out_of_the_root_are_not_listed(server, clip_bytes):
    fp, inp, outside = server
    folder = inp / "set"
    (folder / "leak.mp4").symlink_to(outside / "secret.mp4")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.mp4").write_bytes(clip_bytes)
    (outside / "d").mkdir()
    (outside / "d" / "c.mp4").symlink_to(folder / "a.mp4")  # a clip inside, its caption folder outside
    (folder / "sub" / "d").symlink_to(outside / "d", target_is_directory=True)
    root = inp.resolve()
    listed = [p.relative_to(folder).as_posix() for p in cap.find_clips(folder, recursive=True, root=root)]
    assert listed == ["a.mp4", "sub/b.mp4"]
    assert not paths.confined(root, folder / "leak.mp4") and paths.confined(root, folder / "a.mp4")
    assert not paths.confined(root, outside / "d" / "c.mp4")  # the caption would be written outside
    # The CLI runs as the user: any path, links included.
    assert "leak.mp4" in [p.name for p in cap.find_clips(folder, recursive=True)]


def test_the_node_run_skips_a_clip_linked_outside(server, tiny):
    fp, inp, outside = server
    (inp / "set" / "leak.mp4").symlink_to(outside / "secret.mp4")  # a clip from outside, decoded and described
    out = caption_node()().caption(tiny, "set", "Describe.", "", "", False, False, 2, 0.25, 2, max_new_tokens=2)
    captions, summary = out["result"]
    assert len(captions) == 1 and "SECRET" not in summary and "leak" not in summary
    assert not (inp / "set" / "leak.txt").exists()


# ---------------------------------------------------------------------------------------
# 2. Load Video: video extensions, self-contained containers only
# ---------------------------------------------------------------------------------------
@pytest.fixture
def playlists(server, tmp_path):
    """An MPEG-TS clip outside the input folder, and playlists in it that name the clip."""
    fp, inp, outside = server
    ts = write_video(outside / "secret.ts", scene_frames(8, 64, 48, scenes=2), fps=4.0)
    head = "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n"
    (inp / "abs.m3u8").write_text(f"{head}{ts}\n#EXT-X-ENDLIST\n")
    (inp / "rel.m3u8").write_text(f"{head}{os.path.relpath(ts, inp)}\n#EXT-X-ENDLIST\n")
    (inp / "renamed.mp4").write_text(f"{head}{ts}\n#EXT-X-ENDLIST\n")
    (inp / "concat.mp4").write_text(f"ffconcat version 1.0\nfile '{outside / 'secret.mp4'}'\n")
    # A polyglot: the playlist, a NUL byte, then a real MPEG-TS clip of other content. PyAV's FFmpeg
    # probes it as mpegts (an allowed container); decord's older FFmpeg as hls, and decodes the
    # outside clip.
    inner = write_video(inp / "inner.ts", scene_frames(8, 64, 48, scenes=3)[::-1].copy(), fps=4.0)
    (inp / "poly.mp4").write_bytes(f"{head}{ts}\n#EXT-X-ENDLIST\n#".encode() + b"\x00" * 8 + b"\n"
                                   + inner.read_bytes())
    (inp / "id3.mp4").write_bytes(b"ID3\x04\x00\x00\x00\x00\x00\x00" + (inp / "poly.mp4").read_bytes())
    return inp


@pytest.mark.parametrize("name", ["abs.m3u8", "rel.m3u8", "renamed.mp4", "concat.mp4", "poly.mp4", "id3.mp4"])
def test_a_playlist_upload_never_decodes_outside_files(playlists, name, monkeypatch):
    node = pack_module("nodes.load_video").AdaTP_LoadVideo
    if name.endswith(".m3u8"):  # ComfyUI's list check, which VALIDATE_INPUTS turns off, done by the node
        message = node.VALIDATE_INPUTS(name)
        assert message is not True and "not a video file" in message
    with pytest.raises(ValueError):
        node().load(name, 4, "uniform", 1.0, 0.0, 0.0)
    for backend in ("decord", "pyav"):  # the core refuses too (the CLI and other callers)
        with pytest.raises(AdaTPInputError, match="not a video file|text file|cannot be read|format|manifest"):
            vid.read_video(playlists / name, 4, backend=backend)


@pytest.mark.parametrize("backend", ["decord", "pyav", "auto"])
def test_the_decoders_check_the_file_themselves(playlists, backend, monkeypatch):
    """A caller that brings its own probe still cannot hand a playlist to a decoder."""
    probe = vid.probe_video(playlists / "set" / "a.mp4")
    monkeypatch.setattr(vid, "_decode_decord", lambda *a, **k: pytest.fail("decord started"))
    monkeypatch.setattr(vid, "_decode_pyav", lambda *a, **k: pytest.fail("PyAV decoded"))
    for name in ("abs.m3u8", "renamed.mp4", "concat.mp4", "poly.mp4", "id3.mp4"):
        with pytest.raises(AdaTPInputError):
            vid.decode_frames(playlists / name, [0.0], probe, backend=backend)


@pytest.mark.parametrize("head, refused", [
    (b"#EXTM3U\n#EXT-X-TARGETDURATION:2\n", True), (b"\xef\xbb\xbf#EXTM3U\n\x00", True),
    (b"ffconcat version 1.0\nfile x\n\x00\x01", True), (b"v=0\no=- 0 0 IN IP4 1.2.3.4\nc=IN IP4 1.2.3.4\n\x00", True),
    (b'<?xml version="1.0"?><MPD xmlns="urn:mpeg:dash"', True), (b"ID3\x04\x00\x00\x00\x00\x00\x00", True),
    (b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00", False), (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01", False),
    (b"RIFF\x24\x10\x00\x00AVI LIST", False), (b"\x47\x40\x00\x10\x00\x00\xb0\x0d", False),
    (b"GIF89a\x40\x00\x30\x00", False), (b"\x00\x00\x01\xba\x44", False),
])
def test_manifest_signatures(head, refused):
    """What some FFmpeg would probe as a demuxer that opens other files; real containers pass."""
    assert vid.names_other_files(head) is refused


def test_only_allowed_containers_are_opened():
    for allowed in ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "mpegts", "gif"):
        vid.check_container(allowed, "x")
    for refused in ("hls", "concat", "dash", "imf", "sdp", "image2", "", None):
        with pytest.raises(AdaTPInputError):
            vid.check_container(refused, "x")


def test_ffmpeg_itself_refuses_a_playlist_demuxer(playlists):
    """The whitelist is given to FFmpeg, so a playlist is refused before it opens anything."""
    import av

    with pytest.raises(av.error.FFmpegError):
        vid.open_video(playlists / "abs.m3u8")
    with vid.open_video(playlists / "set" / "a.mp4") as container:
        assert "mp4" in container.format.name


def test_a_file_replaced_after_the_probe_gives_no_frames(playlists, monkeypatch):
    """The decord child reopens the file by name: if an upload replaced it after the
    probe, whatever was decoded is discarded."""
    clip = playlists / "swap.mp4"
    shutil.copy(playlists / "set" / "a.mp4", clip)
    real = vid.decode_frames

    def swap_then_decode(path, *args, **kwargs):
        out = real(path, *args, **kwargs)
        shutil.copy(playlists / "renamed.mp4", clip)  # ComfyUI's upload with overwrite: same inode
        return out

    monkeypatch.setattr(vid, "decode_frames", swap_then_decode)
    with pytest.raises(AdaTPInputError, match="changed while it was being read"):
        vid.read_video(clip, 2)


# ---------------------------------------------------------------------------------------
# 3 and 7. Probe-time limits
# ---------------------------------------------------------------------------------------
def long_mkv(path: Path, seconds: int = 10_000_000) -> Path:
    """A tiny Matroska file: two 16x16 frames, the second stamped at ``seconds``."""
    import av

    tb = fractions.Fraction(1, 1000)
    with av.open(str(path), "w", format="matroska") as c:
        s = c.add_stream("mpeg4", rate=1)
        s.width = s.height = 16
        s.pix_fmt = "yuv420p"
        s.time_base = s.codec_context.time_base = tb
        for k, t in enumerate((0, seconds)):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 60 * k, np.uint8), format="rgb24")
            frame.pts, frame.time_base = t * 1000, tb
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def run_limited(code: str, limit_mb: int | None = 600) -> subprocess.CompletedProcess:
    """Run ``code`` in a child whose data segment is capped (RLIMIT_DATA) at about
    ``limit_mb`` MB more than the interpreter with numpy and PyAV loaded uses (None: no cap)."""
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        import numpy, av
        from adatp_core import video as vid
        used = int(open("/proc/self/statm").read().split()[5]) * resource.getpagesize()
        cap = used + ({limit_mb} or 0) * 2**20
        if {limit_mb is not None}:
            resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    """) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA and /proc are Linux's")
def test_fps_sampling_of_a_huge_duration_needs_no_memory(tmp_path):
    mkv = long_mkv(tmp_path / "long.mkv")
    assert mkv.stat().st_size < 2000
    result = run_limited(f"""
        probe = vid.VideoProbe(fps=1.0, duration=10_000_001.0, frame_count=2, width=16, height=16,
                               codec="mpeg4", start_time=0.0)
        times = vid.sample_times(probe, 1024, "fps", fps=240.0)  # 2.4e9 candidates
        assert len(times) == 1024 and times[0] == 0.0 and abs(times[-1] - 10_000_000) < 1, times[-3:]
        try:
            vid.read_video({str(mkv)!r}, 1024, "fps", fps=240.0)
        except vid.AdaTPInputError as exc:
            print("REFUSED", exc)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REFUSED" in result.stdout and "longer than the pack's limit" in result.stdout


def test_fps_times_are_the_same_as_every_candidate_thinned():
    probe = vid.VideoProbe(fps=30.0, duration=100.0, frame_count=3000, width=64, height=48, codec="h264",
                           start_time=0.0)
    for fps, n, start, end in [(1.0, 8, 0.0, 0.0), (7.5, 1024, 3.0, 50.0), (2.0, 3, 10.0, 11.0), (240.0, 17, 0, 0)]:
        last = min(end, probe.duration - 1 / probe.fps) if end else probe.duration - 1 / probe.fps
        every = [start + k / fps for k in range(int(np.floor((last - start) * fps + 1e-6)) + 1)]
        if len(every) > n:
            every = [every[i] for i in np.linspace(0, len(every) - 1, n).round().astype(int)]
        assert vid.sample_times(probe, n, "fps", fps, start, end) == every


@pytest.mark.parametrize("field, value, message", [
    ("duration", lambda: vid.MAX_DURATION + 1, "longer than"),
    ("start_time", lambda: vid.MAX_DURATION * 2, "longer than"),
    ("frame_count", lambda: vid.MAX_FRAME_COUNT + 1, "frames, more than"),
    ("width", lambda: vid.MAX_SIDE + 2, "larger than"),
    ("height", lambda: vid.MAX_PIXELS // 4096 + 2, "larger than"),
    ("fps", lambda: float("nan"), "not a number"),
])
def test_probe_limits(field, value, message):
    value = value()
    base = dict(fps=30.0, duration=60.0, frame_count=1800, width=4096, height=2160, codec="h264", start_time=0.0)
    vid.check_limits(vid.VideoProbe(**base), "ok.mp4")
    with pytest.raises(AdaTPInputError, match=message):
        vid.check_limits(vid.VideoProbe(**{**base, field: value}), "x.mp4")


def test_an_8192_square_video_is_refused_before_decoding(tmp_path, monkeypatch):
    import av

    path = tmp_path / "big.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=1)
        s.width = s.height = 8192
        s.pix_fmt = "yuv420p"
        s.options = {"preset": "ultrafast"}
        frame = av.VideoFrame(8192, 8192, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        for packet in [*s.encode(frame), *s.encode()]:
            c.mux(packet)
    assert path.stat().st_size < 400_000
    monkeypatch.setattr(vid, "decode_frames", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(AdaTPInputError, match="8192x8192, larger than"):
        vid.read_video(path, 4)
    if sys.platform.startswith("linux"):  # not even the probe decodes a 100 MB frame (peak RSS growth)
        result = run_limited(f"""
            def status(key):
                return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])

            open("/proc/self/clear_refs", "w").write("5")  # peak RSS := RSS now
            before = status("VmRSS:")
            try:
                vid.read_video({str(path)!r}, 4, backend="pyav")
            except vid.AdaTPInputError as exc:
                print("REFUSED", exc)
            print("GROWTH_KB", status("VmHWM:") - before)
        """, limit_mb=None)
        assert "REFUSED" in result.stdout and "larger than" in result.stdout, result.stderr[-2000:]
        growth = int(result.stdout.split("GROWTH_KB")[1])
        assert growth < 50_000, growth  # an 8192x8192 frame alone is 100 MB (yuv420p) to 200 MB (rgb)


# ---------------------------------------------------------------------------------------
# 5. The weight index
# ---------------------------------------------------------------------------------------
@pytest.fixture
def model_copy(tiny_dir, tmp_path) -> Path:
    dst = tmp_path / "LLM" / "model"
    shutil.copytree(tiny_dir, dst)
    return dst


@pytest.mark.parametrize("entry", ["ABS", "../elsewhere/model.safetensors", "sub/model.safetensors",
                                   "..\\model.safetensors", "C:model.safetensors", "model.bin",
                                   "pytorch_model.bin", "model.safetensors.py", 7])
def test_the_weight_index_names_only_safetensors_in_the_folder(model_copy, tmp_path, entry, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(model_copy / "model.safetensors", elsewhere / "model.safetensors")
    (model_copy / "sub").mkdir()
    shutil.copy(model_copy / "model.safetensors", model_copy / "sub" / "model.safetensors")
    for name in ("model.bin", "pytorch_model.bin", "model.safetensors.py", "C:model.safetensors"):
        (model_copy / name).write_bytes(b"\x80\x04pickle")
    entry = str(elsewhere / "model.safetensors") if entry == "ABS" else entry
    shutil.move(model_copy / "model.safetensors", tmp_path / "moved.safetensors")  # only the index remains
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00001.safetensors", "b": entry}}
    (model_copy / "model-00001-of-00001.safetensors").write_bytes(b"")
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    import torch

    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(AdaTPInputError, match="weight index .* must be the name of a .safetensors file"):
        check_model_folder(model_copy)


def test_an_unpickling_error_is_the_packs_error(model_copy, monkeypatch):
    import pickle

    model_type = json.loads((model_copy / "config.json").read_text())["model_type"]
    import transformers

    cls = getattr(transformers, ADAPTERS[model_type].model_class)

    def unpickle(*a, **k):
        raise pickle.UnpicklingError("Weights only load failed")

    monkeypatch.setattr(cls, "from_pretrained", unpickle)
    with pytest.raises(AdaTPInputError, match="cannot be loaded .*UnpicklingError"):
        load_video_llm(model_copy, device="cpu")


# ---------------------------------------------------------------------------------------
# 6 and 8. Download names, disk floor, Windows forms
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..\\config.json", "a\\b.json", "C:config.json", "c:\\x.safetensors",
                                  "\\\\server\\share\\x.json", "/etc/x.json", "//server/x.json", "../x.json",
                                  "..json", "config.json:stream", "x\x00.json", ".."])
def test_the_download_filter_refuses_path_like_names(name):
    assert not dl.wanted_file(name)


def test_the_download_filter_keeps_model_files():
    for name in ("config.json", "model-00001-of-00004.safetensors", "tokenizer.model", "chat_template.jinja"):
        assert dl.wanted_file(name)
    files = [dl.RemoteFile("config.json", 10), dl.RemoteFile("model.safetensors", 10),
             dl.RemoteFile("..\\..\\evil.json", 10), dl.RemoteFile("C:evil.safetensors", 10)]
    assert [f.name for f in dl.select_files("o/r", files)] == ["config.json", "model.safetensors"]


def test_a_configurable_free_disk_floor(tmp_path, monkeypatch):
    plan = dl.DownloadPlan("o/r", "abc", (dl.RemoteFile("model.safetensors", 10**9),))

    class Disk:
        free = 3 * 10**9

    monkeypatch.setattr(dl.shutil, "disk_usage", lambda path: Disk)
    monkeypatch.delenv(dl.MIN_FREE_ENV, raising=False)
    dl._check_space(tmp_path, tmp_path / ".p", plan)  # 64 MiB floor: fits
    monkeypatch.setenv(dl.MIN_FREE_ENV, "2.5")
    with pytest.raises(OSError, match="GB needed"):
        dl._check_space(tmp_path, tmp_path / ".p", plan)
    monkeypatch.setenv(dl.MIN_FREE_ENV, "lots")
    with pytest.raises(RuntimeError, match="ADATP_MIN_FREE_GB"):
        dl._check_space(tmp_path, tmp_path / ".p", plan)


@pytest.mark.parametrize("name", ["C:mymodel", "c:..", "D:\\models\\x", "\\\\host\\share", "a:b"])
def test_windows_model_names_are_refused(name):
    assert not paths.bare_name(name, ntpath)
    with pytest.raises(ValueError, match="not a folder name"):
        pack_module("nodes.load_model").resolve_model(name)


def test_outside_paths_are_refused_before_they_are_resolved(server, monkeypatch):
    """Nothing outside is touched (on Windows, resolving \\\\host\\share connects to the host)."""
    fp, inp, outside = server
    touched = []
    real_resolve = Path.resolve

    def spy(self, strict=False):
        touched.append(str(self))
        return real_resolve(self, strict)

    monkeypatch.setattr(Path, "resolve", spy)
    for name in [str(outside / "x"), "//host/share/x"]:
        assert caption_node().VALIDATE_INPUTS(name) is not True
    assert pack_module("nodes.load_video").AdaTP_LoadVideo.VALIDATE_INPUTS("../private/secret.mp4") is not True
    assert not [t for t in touched if "private" in t or "host" in t], touched


def test_paths_on_another_drive_are_outside_not_an_exception(monkeypatch, tmp_path):
    assert not paths.inside("C:\\ComfyUI\\input", "D:\\secret.mp4", ntpath)
    assert paths.inside("C:\\ComfyUI\\input", "c:\\comfyui\\INPUT\\clip.mp4", ntpath)
    assert not paths.inside("C:\\ComfyUI\\input", "C:\\ComfyUI\\input2\\x.mp4", ntpath)
    # What Windows' commonpath does with two drives, seen through Load Video's path check.
    bridge = pack_module("nodes.comfy_bridge")
    monkeypatch.setattr(bridge.HEADLESS, "input_dir", tmp_path)

    def two_drives(paths_):
        raise ValueError("Paths don't have the same drive")

    monkeypatch.setattr(paths.os.path, "commonpath", two_drives)
    with pytest.raises(ValueError, match="outside the input directory"):
        pack_module("nodes.load_video").resolve_video("clip.mp4")


def test_caption_job_without_a_root_is_the_cli(tmp_path, clip_bytes, tiny):
    """The CLI's job has no root and takes any path (it runs as the user)."""
    (tmp_path / "x.mp4").write_bytes(clip_bytes)
    job = cap.CaptionJob(folder=tmp_path, pipeline=PipelineConfig(num_frames=2, generation=SamplingConfig(
        max_new_tokens=2)), workers=0)
    assert job.root is None
    assert cap.caption_folder(tiny, job).done == ["x.mp4"]


# ---------------------------------------------------------------------------------------
# Clip Dataset (issue 29): sources only under input/, the set only under output/
# ---------------------------------------------------------------------------------------
def clip_node():
    return pack_module("nodes.clip_dataset").AdaTP_ClipDataset


def test_clip_dataset_refuses_sources_and_outputs_outside(server, tmp_path, tiny):
    fp, inp, outside = server
    out = Path(fp.get_output_directory())
    (inp / "out_link").symlink_to(outside, target_is_directory=True)
    (inp / "secret_link.mp4").symlink_to(outside / "secret.mp4")
    node = clip_node()
    for name in [str(outside), str(outside / "secret.mp4"), "/", "../../private", "out_link", "secret_link.mp4",
                 "set\n../../private", str(inp / "out_link"), "http://example.com/a.mp4"]:
        message = node.VALIDATE_INPUTS(sources=name)
        assert message is not True and ("outside" in message or "URL" in message), name
        if "link" in name:
            assert str(outside) not in message, name  # a link's target is never named
    for name in [str(outside), "../x", "../../private", str(tmp_path), "/tmp", str(inp)]:
        message = node.VALIDATE_INPUTS(output=name)
        assert message is not True and "outside" in message, name
    out.mkdir(parents=True, exist_ok=True)
    (out / "to_private").symlink_to(outside, target_is_directory=True)
    assert "outside" in node.VALIDATE_INPUTS(output="to_private")
    assert node.VALIDATE_INPUTS(sources="set", output="my_set") is True
    (out / "my_set").mkdir()
    (out / "my_set" / "videos").symlink_to(outside, target_is_directory=True)  # clips would land outside
    with pytest.raises(ValueError, match="leads outside"):
        clip_node()().make(tiny, "set", "my_set", "Describe.", "", 0.1, 1.0, 4.0, "any")


def test_clip_dataset_reads_and_writes_nothing_outside(server, tiny):
    fp, inp, outside = server
    (inp / "set" / "leak.mp4").symlink_to(outside / "secret.mp4")  # listed from inside, lying outside
    node = clip_node()
    before = sorted(p.name for p in outside.iterdir())
    with pytest.raises(ValueError, match="outside"):
        node().make(tiny, str(outside), "set", "Describe.", "PWNED ", 0.1, 1.0, 4.0, "any", max_new_tokens=2)
    with pytest.raises(ValueError, match="outside"):
        node().make(tiny, "set", str(outside), "Describe.", "PWNED ", 0.1, 1.0, 4.0, "any", max_new_tokens=2)
    summary = node().make(tiny, "set", "my_set", "Describe.", "", 0.1, 1.0, 4.0, "any", caption_frames=2,
                          max_new_tokens=2, batch_size=1)["result"][0]
    assert sorted(p.name for p in outside.iterdir()) == before and (outside / "secret.txt").read_text() == "SECRET"
    assert "leak" not in summary and "secret" not in summary
    made = list((Path(fp.get_output_directory()) / "my_set" / "videos").glob("*.mp4"))
    assert made and "Sources: 1 (0 failed)" in summary  # a.mp4 only: the link out was not listed
