"""ComfyUI-AdaTP: video question answering and captioning with Video LLMs, made
several times cheaper by AdaTP (Attention-Debiased Token Pruning, arXiv 2505.20100).

ComfyUI imports this file as a package (whatever the folder is called); every
import below is relative, so ComfyUI's own top-level ``nodes`` module is never
shadowed. Importing registers models/LLM with ComfyUI's folder_paths and does
nothing else: no downloads, no installs, no patching.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.comfy_bridge import register_model_folder

WEB_DIRECTORY = "./web"

register_model_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
