"""Every node input is a stranger's input: one check of a node's inputs against its INPUT_TYPES.

A ComfyUI server may be reachable from a network, and its API format lets a client put any
JSON value in any input: a string where a link to the model belongs, a number where a
BOOLEAN is due, NaN in a FLOAT. ComfyUI converts and range-checks only literal INT, FLOAT
and STRING values, and not those that a node's VALIDATE_INPUTS names; linked values and
literals in socket inputs (ADATP_MODEL, IMAGE...) reach the node as they are.

So every node's function is wrapped by ``checked``: before it runs, each input is checked
against the type its INPUT_TYPES declares (``check_inputs``), and a wrong one is an
AdaTPInputError that names the input, says what came and what to connect or type. The
values of the core's own settings (ranges, names, text) stay the core's to check.
``validation`` is the same check for VALIDATE_INPUTS, plus the widget's range, which
ComfyUI no longer checks for an input that VALIDATE_INPUTS names.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable

import numpy as np
import torch

from ..adatp_core.errors import AdaTPInputError
from ..adatp_core.runtime import VideoLLM
from ..adatp_core.paths import short_repr
from ..adatp_core.state import AdaTPState
from ..adatp_core.video import VideoInfo

LINK_HINT = " (in the API format a link is [node_id, output_index], not a value)"


def _is_a(value, cls) -> bool:
    """isinstance by the class's place in the pack: the pack may be imported twice (as the custom
    node package and as plain adatp_core, in tests and scripts), and either one's object is good."""
    module = cls.__module__[cls.__module__.find("adatp_core"):]
    return any(k.__qualname__ == cls.__qualname__ and k.__module__.endswith(module) for k in type(value).__mro__)


def _frames_problem(value) -> str | None:
    """What keeps ``value`` from being a ComfyUI IMAGE ([T, H, W, C >= 3] floats 0..1 or bytes,
    at least one frame), or None."""
    if not isinstance(value, torch.Tensor):
        return "not a tensor"
    if value.ndim != 4 or value.shape[-1] < 3 or min(value.shape[1:3]) < 1:
        return "not [T, H, W, 3]"
    if value.shape[0] < 1:
        return "no frames"
    if not (value.is_floating_point() or value.dtype == torch.uint8):
        return "neither floats nor bytes"
    return None


# Each socket type: (its test, what it is, what to connect).
SOCKETS = {
    "ADATP_MODEL": (lambda v: _is_a(v, VideoLLM), "a loaded Video LLM", "connect Load Video LLM's model output"),
    "ADATP_STATE": (lambda v: _is_a(v, AdaTPState), "an AdaTP state",
                    "connect the state output of Extract Attention, a debias node or Prune Tokens"),
    "ADATP_VIDEO_INFO": (lambda v: _is_a(v, VideoInfo), "video info",
                         "connect the video_info output of Load Video, Sample Video or Frame Times"),
    "IMAGE": (lambda v: _frames_problem(v) is None, "frames [T, H, W, 3] of floats 0..1, at least one",
              "connect a video loader's frames or an image batch"),
    "VIDEO": (lambda v: callable(getattr(v, "get_components", None)), "a ComfyUI VIDEO",
              "connect core Load Video, Create Video or a video model"),
}


def described(value) -> str:
    """What came, in a few words: its type, and its value when that is short to say."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    return f"{type(value).__name__} {short_repr(value)}"


def _socket(name: str, kind: str, value):
    test, what, connect = SOCKETS[kind]
    if not test(value):
        why = f" ({_frames_problem(value)})" if kind == "IMAGE" else ""
        raise AdaTPInputError(f"input {name!r} must be {what} ({kind}), got {described(value)}{why}; "
                              f"{connect}{LINK_HINT}.")
    return value


def _widget(name: str, kind: str, value):
    """A widget's value of the declared kind (a numpy number becomes Python's), or AdaTPInputError."""
    if kind == "BOOLEAN":
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise AdaTPInputError(f"input {name!r} must be true or false, got {described(value)}; send a JSON boolean.")
    if kind == "INT":
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise AdaTPInputError(f"input {name!r} must be a whole number, got {described(value)}; send a JSON integer.")
    if kind == "FLOAT":
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise AdaTPInputError(f"input {name!r} must be a finite number, got {described(value)}; send a JSON number "
                              "(not NaN or Infinity).")
    if kind in ("STRING", "COMBO"):
        if isinstance(value, str):
            return value
        what = "text" if kind == "STRING" else "one of its choices, as text"
        raise AdaTPInputError(f"input {name!r} must be {what}, got {described(value)}; send a JSON string.")
    return value  # a type this helper does not know ("*"): the node takes anything


@functools.lru_cache(maxsize=None)
def declared(node_class) -> dict:
    """{input name: (kind, options, optional)} from the node's INPUT_TYPES ("COMBO" for a list of
    choices). The kinds never change; the choices may, and are not kept."""
    spec = node_class.INPUT_TYPES()
    out = {}
    for group in ("required", "optional"):
        for name, (kind, *rest) in spec.get(group, {}).items():
            out[name] = ("COMBO" if isinstance(kind, (list, tuple)) else kind, dict(rest[0]) if rest else {},
                         group == "optional")
    return out


def check_inputs(node_class, values: dict) -> dict:
    """``values`` (input name -> value) checked against the types ``node_class`` declares; returns
    them with numbers as Python's own. An optional socket may be None (nothing connected)."""
    spec = declared(node_class)
    out = dict(values)
    for name, value in values.items():
        if name not in spec:
            continue
        kind, _, optional = spec[name]
        if kind in SOCKETS:
            if not (optional and value is None):
                out[name] = _socket(name, kind, value)
        else:
            out[name] = _widget(name, kind, value)
    return out


def checked(function):
    """A node's FUNCTION with ``check_inputs`` before its first line."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def run(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        values = {k: v for k, v in bound.arguments.items() if k != "self"}
        return function(self, **check_inputs(type(self), values))

    return run


def _in_range(name: str, value, options: dict) -> None:
    low, high = options.get("min"), options.get("max")
    if isinstance(value, (int, float)) and ((low is not None and value < low) or (high is not None and value > high)):
        raise AdaTPInputError(f"input {name!r} must be from {low} to {high} (its widget's range), got {value!r}.")


def validation(node_class, values: dict, check: Callable[[str, object], object] | None = None):
    """VALIDATE_INPUTS' answer (True, or the message) for the values ComfyUI hands it.

    A value that is None is linked (ComfyUI passes None, or nothing, for a link): it is checked
    when the node runs. Each other one is checked by type, then by ``check(name, value)`` (the
    core's own check, which raises AdaTPInputError and says why), then against its widget's min
    and max, which ComfyUI no longer checks for an input that VALIDATE_INPUTS names.
    """
    spec = declared(node_class)
    try:
        for name, value in check_inputs(node_class, {k: v for k, v in values.items() if v is not None}).items():
            if check is not None:
                check(name, value)
            if name in spec:  # a hidden input or one a newer ComfyUI adds: nothing declared to check
                _in_range(name, value, spec[name][1])
    except AdaTPInputError as exc:
        return str(exc)
    return True
