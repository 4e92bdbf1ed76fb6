"""The pack's ComfyUI nodes (classic API): thin wrappers over adatp_core.

Each node validates, calls one core function, and wraps the result. Input names
and their order are the workflow file format: never rename or reorder them.
"""

from . import comfy_bridge
from .caption_folder import AdaTP_CaptionFolder
from .clip_dataset import AdaTP_ClipDataset
from .extract_attention import AdaTP_ExtractAttention
from .extract_attention_video import AdaTP_ExtractAttentionVideo
from .frame_times import AdaTP_FrameTimes
from .generate_answer import AdaTP_GenerateAnswer
from .global_debias import AdaTP_GlobalDebias
from .load_model import AdaTP_LoadVideoLLM
from .load_video import AdaTP_LoadVideo
from .local_debias import AdaTP_LocalDebias
from .preview_tokens import AdaTP_PreviewTokens
from .prune_tokens import AdaTP_PruneTokens
from .self_check import AdaTP_SelfCheck
from .sample_video import AdaTP_SampleVideo

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    AdaTP_LoadVideoLLM, AdaTP_LoadVideo, AdaTP_ExtractAttention, AdaTP_GlobalDebias,
    AdaTP_LocalDebias, AdaTP_PruneTokens, AdaTP_GenerateAnswer, AdaTP_PreviewTokens, AdaTP_CaptionFolder,
    AdaTP_SelfCheck,
    AdaTP_FrameTimes, AdaTP_ClipDataset,
)}
# A ComfyUI older than the VIDEO type (before 0.3.30) gets no Sample Video; the rest works.
if comfy_bridge.has_video_type():
    NODE_CLASS_MAPPINGS["AdaTP_SampleVideo"] = AdaTP_SampleVideo
    NODE_CLASS_MAPPINGS["AdaTP_ExtractAttentionVideo"] = AdaTP_ExtractAttentionVideo

NODE_DISPLAY_NAME_MAPPINGS = {
    "AdaTP_LoadVideoLLM": "AdaTP Load Video LLM",
    "AdaTP_LoadVideo": "AdaTP Load Video",
    "AdaTP_ExtractAttention": "AdaTP Extract Attention",
    "AdaTP_GlobalDebias": "AdaTP Global Debias",
    "AdaTP_LocalDebias": "AdaTP Local Debias",
    "AdaTP_PruneTokens": "AdaTP Prune Tokens",
    "AdaTP_GenerateAnswer": "AdaTP Generate Answer",
    "AdaTP_PreviewTokens": "AdaTP Preview Tokens",
    "AdaTP_CaptionFolder": "AdaTP Caption Folder",
    "AdaTP_SelfCheck": "AdaTP Self Check",
    "AdaTP_FrameTimes": "AdaTP Frame Times",
    "AdaTP_SampleVideo": "AdaTP Sample Video",
    "AdaTP_ClipDataset": "AdaTP Clip Dataset",
    "AdaTP_ExtractAttentionVideo": "AdaTP Extract Attention (Video File)",
}
NODE_DISPLAY_NAME_MAPPINGS = {k: v for k, v in NODE_DISPLAY_NAME_MAPPINGS.items() if k in NODE_CLASS_MAPPINGS}
