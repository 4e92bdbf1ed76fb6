"""A name patched on the caption package reaches its parts, and the patch's undo reaches them
too: monkeypatch undoes a name the package only looked up by deleting it, which must put the
parts' own object back (else a later test's caption run calls the patched function)."""
import adatp_core.caption as cap
import adatp_core.caption.stream as stream
import adatp_core.video as video


def test_a_patch_reaches_the_parts(monkeypatch):
    real = cap.decode_plan
    monkeypatch.setattr(cap, "decode_plan", lambda *a: real(*a))
    assert stream.decode_plan is not real and stream.decode_plan is cap.decode_plan


def test_its_undo_reaches_them_too():
    assert stream.decode_plan is video.decode_plan and cap.decode_plan is video.decode_plan
