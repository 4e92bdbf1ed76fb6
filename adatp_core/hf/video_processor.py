"""The installed transformers' video-processor defaults, read without importing the processors.

A model folder's video_preprocessor_config.json gives only what its authors set; the rest (Qwen3-VL's
fps 2, min_frames 4, max_frames 768; the ``cap_pixels_per_frame`` switch) comes from the processor
class of the installed release. Those modules import PIL at the top and their processors need
torchvision, which a ComfyUI install may lack (and CI does), so the class's plain settings are read
from its source: the assignments in the class body whose value is a literal.

Releases: ``cap_pixels_per_frame`` (None: uncapped, with a warning that the capped behaviour will
become the default) and ``max_video_tokens`` are in the Qwen2-VL and Qwen3-VL video processors of
5.25; a release without them has no cap, and none is applied.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging

log = logging.getLogger(__name__)

# class name -> the module that defines it
_MODULES = {"Qwen2VLVideoProcessor": "transformers.models.qwen2_vl.video_processing_qwen2_vl",
            "Qwen3VLVideoProcessor": "transformers.models.qwen3_vl.video_processing_qwen3_vl"}


@functools.lru_cache(maxsize=None)
def processor_class_defaults(class_name: str) -> dict:
    """{name: value} of the literal class attributes of the installed ``class_name`` (for example
    ``{"fps": 2, "min_frames": 4, "max_frames": 768, "cap_pixels_per_frame": None, ...}``);
    {} when the release has no such class or its source cannot be read."""
    module = _MODULES.get(class_name)
    try:
        spec = importlib.util.find_spec(module) if module else None
        source = open(spec.origin, encoding="utf-8").read() if spec and spec.origin else None
    except (ImportError, OSError, ValueError) as exc:
        log.debug("cannot read %s's source: %s", class_name, exc)
        return {}
    if source is None:
        return {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            out = {}
            for item in node.body:
                if isinstance(item, ast.Assign) and len(item.targets) == 1 and isinstance(item.targets[0], ast.Name):
                    try:
                        out[item.targets[0].id] = ast.literal_eval(item.value)
                    except (ValueError, TypeError, SyntaxError):  # not a literal (a product, a constant from elsewhere)
                        pass
            return out
    return {}
