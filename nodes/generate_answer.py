"""AdaTP Generate Answer: continue from layer K with the kept tokens and decode."""

from __future__ import annotations

from ..adatp_core.errors import AdaTPInputError
from ..adatp_core.generate import generate_answer
from ..adatp_core.memory import release_pinned
from ..adatp_core.report import stats_text
from ..adatp_core.sampling import WIDGETS, SamplingConfig, widget_sampling
from . import comfy_bridge as bridge
from .inputs import checked, validation

SEED_MAX = 0xFFFFFFFFFFFFFFFF
# The last optional input, `settings`: whose generation settings choose the tokens.
MODEL_SETTINGS = "model"      # the model's generation_config.json, as transformers' generate() reads it
WIDGET_SETTINGS = "widgets"   # do_sample, temperature, top_p (+ repetition_penalty, top_k) of this node
SETTINGS = {"settings": ([MODEL_SETTINGS, WIDGET_SETTINGS], {
    # A new node gets the model's own settings; a workflow saved before this input existed keeps the
    # widgets' (its answers): headless.py and web/adatp.js fill a missing saved value with
    # "saved_default", not "default", and an API prompt without the input gets the Python default.
    "default": MODEL_SETTINGS, "saved_default": WIDGET_SETTINGS,
    "tooltip": "model: the model's own generation settings (its generation_config.json: do_sample, temperature, "
               "top_k, top_p, repetition_penalty; e.g. Qwen3.5 samples at temperature 1.0, top_k 20, top_p 0.95), "
               "exactly as transformers' generate() applies them, with this node's seed; do_sample, temperature, "
               "top_p, repetition_penalty and top_k are then not used. widgets: those widgets decide (what "
               "workflows saved before this input get)."})}


class AdaTP_GenerateAnswer:
    DESCRIPTION = ("Answers the question from the kept tokens: the LLM goes on from layer K with only "
                   "those tokens, at their original positions. Given a state that no Prune Tokens "
                   "touched, this is the vanilla model.")
    CATEGORY = "AdaTP"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("answer", "stats")
    OUTPUT_TOOLTIPS = ("The generated answer.", "Tokens kept, FLOPs and timings, as text.")
    OUTPUT_NODE = True
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "state": ("ADATP_STATE", {"tooltip": "From Prune Tokens (AdaTP), or Extract Attention (vanilla)."}),
            "max_new_tokens": ("INT", {"default": 128, "min": 1, "max": 8192,
                                       "tooltip": "The longest answer, in tokens."}),
            "do_sample": ("BOOLEAN", {"default": False, "tooltip": "Off: greedy (deterministic). On: sample "
                                                                   "with temperature and top_p."}),
            "temperature": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 5.0, "step": 0.05,
                                      "tooltip": "Sampling temperature (do_sample only)."}),
            "top_p": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                "tooltip": "Nucleus sampling mass (do_sample only)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                             "tooltip": "Sampling seed (do_sample only)."}),
        }, "optional": {**WIDGETS, **SETTINGS}}  # repetition_penalty, top_k: the model's unless set (sampling.py)

    @classmethod
    def VALIDATE_INPUTS(cls, temperature=None, top_p=None, repetition_penalty=None):
        # The settings whose NaN (or, for the two that divide the logits, a tiny value) passes ComfyUI's
        # own range check. Naming them skips that check: validation() makes it, then the core's floors.
        return validation(cls, {"temperature": temperature, "top_p": top_p, "repetition_penalty": repetition_penalty},
                          lambda name, value: widget_sampling(**{name: value}))

    @checked
    def generate(self, state, max_new_tokens, do_sample, temperature, top_p, seed, repetition_penalty=0.0, top_k=-1,
                 settings=WIDGET_SETTINGS):
        if settings == MODEL_SETTINGS:  # every setting unset: the model's, as stock generate() fills them
            cfg = SamplingConfig(max_new_tokens=max_new_tokens, seed=seed)
        elif settings == WIDGET_SETTINGS:
            cfg = widget_sampling(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_p=top_p, seed=seed, repetition_penalty=repetition_penalty, top_k=top_k)
        else:
            raise AdaTPInputError(f"settings must be {MODEL_SETTINGS!r} (the model's generation_config.json) or "
                                  f"{WIDGET_SETTINGS!r} (this node's widgets), got {settings!r}")
        progress = bridge.Progress(max_new_tokens)
        bridge.check_interrupt()
        bridge.activate(state.model)
        try:
            # the bar's position from the step: an answer that runs again (out of memory with its keys and
            # values on the device, or static decoding that failed) calls on_token again from step 0
            answer = generate_answer(state, cfg, on_token=lambda step, _token: progress.set(step + 1))
        finally:
            if bridge.release(state.model):
                bridge.soft_empty_cache()
            release_pinned()  # earlier runs' states ComfyUI let go of: their pinned host rows go back to the OS
        whose = "the model's (generation_config.json)" if settings == MODEL_SETTINGS else "this node's widgets"
        stats = "\n".join(f"{line} (settings: {whose})" if line.startswith("Generation:") else line
                          for line in stats_text(answer.stats).splitlines())
        return {"ui": {"text": [answer.text, stats]}, "result": (answer.text, stats)}
