"""adatp_core: AdaTP (Attention-Debiased Token Pruning) for Video LLMs.

A plain library over torch and transformers; it never imports ComfyUI. The data
path goes one way: video.py (frames) -> models/ (visual tokens) -> attention.py
(layer-K scores) -> segment.py / debias.py / prune.py (keep set) -> generate.py
(answer). pipeline.py composes the stages; each stage is one public function.
"""

__version__ = "0.1.0"
