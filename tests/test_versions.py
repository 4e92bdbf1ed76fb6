"""The tested transformers range (hf/versions.py): one warning per process for an untested release,
the doctor's environment block and failure line, and an error raised inside transformers reaching
the user as the pack's clear error (the family, the versions, what to do), while running out of
memory, interrupts and the pack's own errors pass through unchanged."""

from __future__ import annotations

import importlib
import logging
import os
import re

import pytest
import torch
import transformers
from conftest import ROOT

from adatp_core import doctor
from adatp_core.errors import AdaTPEnvironmentError, AdaTPInputError, AdaTPTransformersError
from adatp_core.hf import versions
from adatp_core.hf.versions import transformers_boundary

NEWER = "5.99.0"
MESSAGE = "'KVCache' object has no attribute 'get_recurrent_states_to_keep'"


def pretend(monkeypatch, version: str) -> None:
    """transformers says it is ``version``: the module imported now (transformers replaces its module
    object in sys.modules when a submodule first loads, so an early ``import transformers`` may be stale)."""
    monkeypatch.setattr(importlib.import_module("transformers"), "__version__", version)


@pytest.fixture
def fresh_warning():
    """The once-per-process warning, forgotten before and after the test."""
    versions._warn_once.cache_clear()
    yield
    versions._warn_once.cache_clear()


def in_transformers(source: str, name: str):
    """The function ``name`` defined by ``source``, compiled as if it were a file inside the installed
    transformers package: its frames are transformers' frames, as a new release's code would be."""
    filename = os.path.join(os.path.dirname(transformers.__file__), "models", "new_release", "modeling_new.py")
    namespace = {"torch": torch}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]


def raiser(exc: BaseException):
    """A transformers-frame function that raises ``exc``."""
    raise_it = in_transformers("def raise_it(exc, *args, **kwargs):\n    raise exc\n", "raise_it")
    return lambda *args, **kwargs: raise_it(exc, *args, **kwargs)


def versions_in(text: str, installed: str) -> None:
    """The clear error's named parts."""
    for part in (f"transformers {installed}", versions.MINIMUM, versions.NEWEST_TESTED, versions.TESTED_ON,
                 "python -m adatp_core doctor", f"pip install transformers=={versions.NEWEST_TESTED}"):
        assert part in text, (part, text)


# ----- the range -------------------------------------------------------------------------------
def test_the_minimum_is_the_one_the_requirements_declare():
    """One constant; pyproject.toml and requirements.txt must say the same lower bound."""
    for path in (ROOT / "pyproject.toml", ROOT / "requirements.txt"):
        bounds = re.findall(r"transformers>=([0-9.]+)", path.read_text())
        assert bounds == [versions.MINIMUM], path
    assert versions.support(versions.MINIMUM) == versions.support(versions.NEWEST_TESTED) == versions.TESTED


def test_the_readme_and_pyproject_write_the_same_range():
    """The README's Supported versions table and pyproject.toml's comment write the range out by hand:
    they must name the constants' minimum, newest tested release and day."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Supported versions"):]
    header, row = (next(line for line in table.splitlines() if line.startswith(start))
                   for start in ("| | supported | tested on", "| transformers |"))
    newest = versions.release(versions.NEWEST_TESTED)
    assert header.startswith(f"| | supported | tested on {versions.TESTED_ON} |"), header
    for part in (f"| {versions.MINIMUM} through the current release ({newest.major}.{newest.minor}),",
                 f"{versions.NEWEST_TESTED}, the newest", f"{versions.MINIMUM}.0, the declared minimum"):
        assert part in row, (part, row)
    assert f"transformers range in `pyproject.toml` ({versions.MINIMUM} and later;" in " ".join(readme.split())
    comment = " ".join(line.lstrip("# ") for line in (ROOT / "pyproject.toml").read_text().splitlines()
                       if line.startswith("#"))
    assert (f"transformers {versions.MINIMUM} through the current release ({newest.major}.{newest.minor} on "
            f"{versions.TESTED_ON})") in comment, comment


@pytest.mark.parametrize("version", [NEWER, "5.10.0", versions.NEWEST_TESTED])
def test_the_warning_the_doctor_and_the_error_say_where_a_release_stands_alike(monkeypatch, caplog, fresh_warning,
                                                                                version):
    """One phrase (versions.standing) for where a release stands, in each reader that names it."""
    pretend(monkeypatch, version)
    said = f"transformers {version} is {versions.standing(version)}"
    with caplog.at_level(logging.WARNING, logger=versions.__name__):
        versions.warn_if_untested()
    warned = [r.getMessage() for r in caplog.records if r.name == versions.__name__]
    assert said in doctor.upgrade_advice()
    if version != versions.NEWEST_TESTED:
        assert len(warned) == 1 and said in warned[0]
        assert said in str(versions.transformers_error(AttributeError("x"), "qwen3_5", "the decoder layers"))
    else:
        assert warned == [] and versions.tested_range() in said


@pytest.mark.parametrize("version, kind", [
    ("5.16.2", versions.OLDER), ("4.57.0", versions.OLDER), ("5.17.0", versions.TESTED), ("5.24.0", versions.TESTED),
    ("5.25.0", versions.TESTED), ("5.25.0+local", versions.TESTED), ("5.25.1", versions.NEWER),
    ("5.26.0.dev0", versions.NEWER), ("6.0.0rc1", versions.NEWER), ("not a version", versions.TESTED)])
def test_support_places_a_release_against_the_range(version, kind):
    assert versions.support(version) == kind


# ----- one log line at load ---------------------------------------------------------------------
def test_a_newer_release_gets_one_warning_per_process_at_load(tiny_dir, monkeypatch, caplog, fresh_warning):
    from adatp_core.models.loader import load_video_llm

    pretend(monkeypatch, NEWER)
    with caplog.at_level(logging.WARNING, logger=versions.__name__):
        load_video_llm(tiny_dir, device="cpu", dtype="float32")
        load_video_llm(tiny_dir, device="cpu", dtype="float32")
    lines = [r for r in caplog.records if r.name == versions.__name__]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    text = lines[0].getMessage()
    assert f"transformers {NEWER} is newer" in text and versions.NEWEST_TESTED in text
    assert "python -m adatp_core doctor" in text and f"pip install transformers=={versions.NEWEST_TESTED}" in text


def test_the_tested_release_gets_no_warning(monkeypatch, caplog, fresh_warning):
    for version in (versions.NEWEST_TESTED, "5.20.1", versions.MINIMUM):
        pretend(monkeypatch, version)
        with caplog.at_level(logging.DEBUG, logger=versions.__name__):
            versions.warn_if_untested()
    assert not [r for r in caplog.records if r.name == versions.__name__]


def test_an_older_release_is_said_once_too(monkeypatch, caplog, fresh_warning):
    pretend(monkeypatch, "5.10.0")
    with caplog.at_level(logging.WARNING, logger=versions.__name__):
        versions.warn_if_untested()
        versions.warn_if_untested()
    lines = [r.getMessage() for r in caplog.records if r.name == versions.__name__]
    assert len(lines) == 1 and "older than this pack's minimum 5.17" in lines[0]


# ----- the doctor ---------------------------------------------------------------------------
def test_the_doctor_shows_installed_and_tested_versions(monkeypatch):
    env = doctor.environment(torch.device("cpu"), torch.float32)
    assert env["transformers"] == versions.installed()
    assert env["transformers tested"] == (f"{versions.MINIMUM} to {versions.NEWEST_TESTED} (newest tested on "
                                          f"{versions.TESTED_ON}); {versions.installed()} "
                                          + {versions.TESTED: "is within the range",
                                             versions.NEWER: "is NEWER than the newest tested: this self-check is "
                                                             "its test",
                                             versions.OLDER: "is OLDER than the minimum: install the newest "
                                                             f"tested (pip install transformers=="
                                                             f"{versions.NEWEST_TESTED})"}[versions.support()])
    pretend(monkeypatch, NEWER)
    env = doctor.environment(torch.device("cpu"), torch.float32)
    assert env["transformers"] == NEWER and f"{NEWER} is NEWER than the newest tested" in env["transformers tested"]
    assert "transformers tested" in doctor.Report(env, (), 0.0).text()


def test_the_doctors_failure_line_says_it_is_the_check_after_upgrading_transformers(monkeypatch):
    failed = doctor.Report({"transformers": NEWER}, (doctor.Check("Qwen3.5", "figures", doctor.FAIL, "raised"),), 1.0)
    passed = doctor.Report({"transformers": NEWER}, (doctor.Check("Qwen3.5", "figures", doctor.PASS),), 1.0)
    pretend(monkeypatch, NEWER)
    line = failed.text().splitlines()[-1]
    assert line.startswith("SOME CHECKS FAILED")
    assert "`python -m adatp_core doctor` is the check to run after upgrading transformers" in line
    assert f"transformers {NEWER} is newer than the newest tested ({versions.NEWEST_TESTED})" in line
    assert f"pip install transformers=={versions.NEWEST_TESTED}" in line
    assert passed.text().splitlines()[-1].startswith("all checks passed") and "upgrading" not in passed.summary()
    pretend(monkeypatch, versions.NEWEST_TESTED)
    line = failed.summary()
    assert "is the check to run after upgrading transformers" in line and "within the tested range" in line


# ----- errors raised inside transformers ---------------------------------------------------------
@pytest.mark.parametrize("kind", [AttributeError, TypeError, KeyError, IndexError, NotImplementedError, ImportError,
                                  ValueError])
def test_an_error_raised_in_transformers_becomes_the_clear_error(kind, monkeypatch):
    pretend(monkeypatch, NEWER)
    original = kind(f"{MESSAGE}\nsecond line")
    with pytest.raises(AdaTPTransformersError) as caught:
        with transformers_boundary("qwen3_5", "the decoder layers"):
            raiser(original)()
    error = caught.value
    assert isinstance(error, AdaTPEnvironmentError) and error.__cause__ is original
    text = str(error)
    assert text.startswith(f"model family qwen3_5: transformers {NEWER} failed in the decoder layers "
                           f"({kind.__name__}: ")
    assert f"{NEWER} is newer than the newest tested" in text
    assert kind is KeyError or "second line" not in text  # a KeyError's text is its key's repr, on one line
    versions_in(text, NEWER)


def test_within_the_tested_range_the_error_says_so(monkeypatch):
    pretend(monkeypatch, versions.NEWEST_TESTED)
    with pytest.raises(AdaTPTransformersError) as caught:
        with transformers_boundary("qwen3_5", "the decoder layers"):
            raiser(AttributeError(MESSAGE))()
    text = str(caught.value)
    versions_in(text, versions.NEWEST_TESTED)
    assert "within that range" in text and "--force-reinstall" in text


def test_torch_frames_between_transformers_and_the_raise_still_count():
    """transformers calling a torch function that raises is transformers' call."""
    call = in_transformers("def call(x):\n    return torch.nn.functional.interpolate(x, mode='nope')\n", "call")
    with pytest.raises(AdaTPTransformersError) as caught:
        with transformers_boundary("llava_onevision", "the vision tower"):
            call(torch.zeros(1, 1, 2, 2))
    assert isinstance(caught.value.__cause__, (NotImplementedError, ValueError))


class InterruptProcessingException(Exception):
    """ComfyUI's Cancel (comfy.model_management), matched by name as memory.is_interrupt does."""


@pytest.mark.parametrize("make", [
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    lambda: RuntimeError("CUDA error: out of memory"),
    lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"),
    lambda: AdaTPInputError("layer K=9 is outside this model's 4 decoder layers"),
    lambda: AdaTPEnvironmentError("static decoding failed on cuda"),
    lambda: KeyboardInterrupt(),
    lambda: InterruptProcessingException(),
    lambda: RuntimeError("expected scalar type Float but found Half"),
], ids=["oom", "oom-runtime", "oom-cpu-text", "pack-input", "pack-environment", "ctrl-c", "comfy-cancel", "runtime"])
def test_out_of_memory_interrupts_and_the_packs_errors_pass_through_unchanged(make):
    original = make()
    with pytest.raises(BaseException) as caught:
        with transformers_boundary("qwen3_5", "the decoder layers"):
            raiser(original)()
    assert caught.value is original


def test_an_error_raised_in_the_packs_own_code_is_not_blamed_on_transformers():
    """transformers calls the pack's object, whose own code raises: the pack's bug, shown as it is."""
    call = in_transformers("def call(cache):\n    return cache.method()\n", "call")

    class Cache:
        def method(self):
            raise AttributeError("the pack's own bug")

    with pytest.raises(AttributeError, match="the pack's own bug") as caught:
        with transformers_boundary("qwen3_5", "the decoder layers"):
            call(Cache())
    assert type(caught.value) is AttributeError


# ----- the boundaries, through transformers' real code ---------------------------------------------
def test_a_cache_that_lacks_what_transformers_calls_is_the_clear_error(tiny, monkeypatch):
    """transformers' own decoder layer, given a cache object without the method it calls: the
    AttributeError is raised in transformers' frame, at the decoder-layer boundary."""
    pretend(monkeypatch, NEWER)
    adapter = tiny.adapter
    hidden = adapter.embed_tokens(torch.tensor([1, 2, 3]))[None]
    with pytest.raises(AdaTPTransformersError) as caught, torch.inference_mode():
        adapter.run_layers(hidden, torch.arange(3)[None], object(), 0, 1)
    assert isinstance(caught.value.__cause__, AttributeError) and "'object' object has no attribute" in str(caught.value)
    assert str(caught.value).startswith(f"model family llava_onevision: transformers {NEWER} failed in the decoder layers")
    versions_in(str(caught.value), NEWER)


def test_the_vision_tower_boundary(tiny, frames, monkeypatch):
    adapter = tiny.adapter
    tower = adapter.model.model.vision_tower
    monkeypatch.setattr(tower.embeddings, "forward", raiser(TypeError("forward() got an unexpected keyword")))
    with pytest.raises(AdaTPTransformersError, match="llava_onevision: .* failed in the vision tower"):
        adapter.encode(adapter.preprocess(frames[:1]), adapter.plan_video(1, *frames.shape[1:3]))


def test_the_position_ids_boundary(tmp_path_factory, monkeypatch):
    """Qwen's position ids come from transformers' get_rope_index."""
    from adatp_core.models.loader import load_video_llm
    from adatp_core.models.tiny_qwen import ensure_tiny_qwen2_5_vl

    llm = load_video_llm(ensure_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen")), device="cpu", dtype="float32")
    adapter = llm.adapter
    prompt = adapter.build_prompt("What moves?", adapter.plan_video(2, 56, 56))
    assert adapter.position_ids(prompt).shape == (3, 1, prompt.length)
    monkeypatch.setattr(adapter.model.model, "get_rope_index", raiser(KeyError("mrope_section")))
    with pytest.raises(AdaTPTransformersError, match=r"qwen2_5_vl: .* in the position ids \(get_rope_index\)"):
        adapter.position_ids(prompt)


def test_the_loader_names_the_family_when_transformers_cannot_build_it(tiny_dir, monkeypatch):
    """from_pretrained's own AttributeError (never caught before) is the clear error; one raised outside
    transformers is not blamed on it."""
    from adatp_core.models.loader import load_video_llm

    cls = transformers.LlavaOnevisionForConditionalGeneration
    monkeypatch.setattr(cls, "from_pretrained", raiser(AttributeError("'LlavaOnevisionConfig' has no attribute 'x'")))
    with pytest.raises(AdaTPTransformersError, match="model family llava_onevision: .* failed in building the model"):
        load_video_llm(tiny_dir, device="cpu", dtype="float32")

    def outside(*args, **kwargs):
        raise AttributeError("not transformers")

    monkeypatch.setattr(cls, "from_pretrained", outside)
    with pytest.raises(AttributeError, match="not transformers"):
        load_video_llm(tiny_dir, device="cpu", dtype="float32")


def test_the_node_shows_the_clear_error(tiny_dir, monkeypatch):
    """Extract Attention, as ComfyUI calls it: the node raises the pack's error, whose text ComfyUI shows."""
    from pack import load_pack, pack_module

    monkeypatch.setenv("ADATP_CACHE_DIR", str(tiny_dir.parent))  # the built-in model is already built there
    nodes = load_pack().NODE_CLASS_MAPPINGS
    errors = pack_module("adatp_core.errors")
    model = nodes["AdaTP_LoadVideoLLM"]().load("adatp-tiny (built-in, random weights)", "float32", "sdpa", "cpu",
                                                True)[0]
    frames, _ = nodes["AdaTP_LoadVideo"]().load("adatp_sample_video.mp4", 4, "uniform", 1.0, 0.0, 0.0)
    layer = model.adapter.text_model.layers[0]
    pretend(monkeypatch, NEWER)
    monkeypatch.setattr(layer, "forward", raiser(AttributeError(MESSAGE)))
    with pytest.raises(errors.AdaTPTransformersError) as caught:
        nodes["AdaTP_ExtractAttention"]().extract(model, frames, "What moves?", 2, "text")
    assert isinstance(caught.value, errors.AdaTPEnvironmentError)
    text = str(caught.value)
    assert text.startswith(f"model family llava_onevision: transformers {NEWER} failed in the decoder layers "
                           f"(AttributeError: {MESSAGE}).")
    versions_in(text, NEWER)


def test_batched_decoding_stops_on_a_transformers_failure(tiny):
    """Every clip would fail the same way: the run stops, as at batch 1 (caption.py's model_error)."""
    from adatp_core.batching import decode_together
    from adatp_core.generate import SamplingConfig

    def prefill():
        raise versions.transformers_error(AttributeError(MESSAGE), "llava_onevision", "the decoder layers")

    with pytest.raises(AdaTPTransformersError):
        list(decode_together(tiny, SamplingConfig(max_new_tokens=2), [("clip", prefill)], batch_size=2))


@pytest.mark.parametrize("where", ["_prefill", "_run"])
def test_a_transformers_failure_in_a_batched_step_stops_the_run(tiny, monkeypatch, where):
    """The same inside the batch: in the rest of a clip's prefill (join) and in a decode step of
    several rows, which were taken for out of memory (the step halved, then each row failed alone)."""
    from test_batching import clip_states

    from adatp_core import batching
    from adatp_core.generate import SamplingConfig

    states = clip_states(tiny)[:2]
    monkeypatch.setattr(batching.DecodeBatch, where, raiser(
        versions.transformers_error(AttributeError(MESSAGE), "llava_onevision", "the decoder layers")))
    with pytest.raises(AdaTPTransformersError):
        list(batching.decode_together(tiny, SamplingConfig(max_new_tokens=4), [(i, lambda s=s: s) for i, s in
                                                                              enumerate(states)], batch_size=2))
