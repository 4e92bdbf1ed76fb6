"""AdaTP Self Check: the doctor (adatp_core/doctor.py) on ComfyUI's device, its table on the node.

Users of ComfyUI's portable builds have no terminal: this node runs the same checks as
``python -m adatp_core doctor`` with the built-in tiny models (nothing is downloaded)
and shows the environment and one line per check, pass, fail or skip.
"""

from __future__ import annotations

from ..adatp_core.doctor import DTYPE_CHOICES, families, run_doctor
from . import comfy_bridge as bridge
from .inputs import checked

DEVICES = ("auto", "cuda", "cpu", "mps")
STEPS_PER_FAMILY = 5  # progress ticks: one per group of checks


class AdaTP_SelfCheck:
    DESCRIPTION = ("Checks that the pack works on this machine, before you download a real model: runs the "
                   "built-in tiny LLaVA-OV, Qwen2.5-VL and Qwen3-VL on the device (nothing is downloaded) and "
                   "compares each fast path with the plain one (stock generate, static decoding and its CUDA "
                   "graph, SDPA kernels, selection without host sync, batched vision). Shows a table: pass, "
                   "fail or skip, and for each failure the setting that avoids it. Takes under a minute on a GPU.")
    CATEGORY = "AdaTP"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("The environment and the table of checks, as text.",)
    OUTPUT_NODE = True
    FUNCTION = "check"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "device": (list(DEVICES), {"default": "auto", "tooltip": "auto: ComfyUI's device (the GPU when "
                                                                     "there is one)."}),
            "dtype": (list(DTYPE_CHOICES), {"default": "auto", "tooltip": "The precision to check. auto: what "
                                                                          "Load Video LLM picks on the device "
                                                                          "(bfloat16 or float16 on GPUs)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")  # the machine, not the inputs, decides the result: run every time

    @checked
    def check(self, device, dtype):
        bridge.check_interrupt()
        progress = bridge.Progress(STEPS_PER_FAMILY * len(families()))
        report = run_doctor(bridge.compute_device(device), dtype, on_check=progress.step)
        bridge.soft_empty_cache()
        text = report.text()
        return {"ui": {"text": [text]}, "result": (text,)}
