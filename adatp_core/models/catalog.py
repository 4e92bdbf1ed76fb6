"""The catalog of known Hugging Face repositories that the pack can download.

Each entry names a repository, the model family it belongs to, and rough
figures a user needs to choose: the download size and the GPU memory it takes
at bfloat16 and at 4-bit. The memory figures are the weights plus about 1.5 GB
of working memory for 32 frames at the default retention; they are estimates,
not measurements.

A download is only ever started by the user picking an entry (see
``download.py``). ``ADATP_EXTRA_CATALOG`` may name a JSON file with more
entries (a list of objects with the fields of ``CatalogEntry``): it is how a
mirror, or a test, offers repositories that are not in the built-in list.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import AdaTPInputError

log = logging.getLogger(__name__)

EXTRA_CATALOG_ENV = "ADATP_EXTRA_CATALOG"


@dataclass(frozen=True)
class CatalogEntry:
    """A downloadable model. Sizes in GB (10^9 bytes)."""

    repo_id: str
    model_type: str      # config.json's model_type, i.e. which adapter loads it
    disk_gb: float       # safetensors and config files
    vram_bf16_gb: float  # approximate GPU memory at bfloat16
    vram_4bit_gb: float  # approximate GPU memory at 4-bit (bitsandbytes nf4)

    def __post_init__(self):
        org, _, name = self.repo_id.partition("/")
        if not org or not name or "/" in name or name in (".", "..") or "\\" in self.repo_id:
            raise AdaTPInputError(f"catalog repo id {self.repo_id!r} is not of the form 'owner/name'")
        for f in ("disk_gb", "vram_bf16_gb", "vram_4bit_gb"):
            if not float(getattr(self, f)) >= 0:
                raise AdaTPInputError(f"catalog entry {self.repo_id}: {f} must be a number >= 0")

    @property
    def folder_name(self) -> str:
        """The folder it is downloaded into, under a models/LLM root: the repo's name."""
        return self.repo_id.split("/", 1)[1]

    @property
    def label(self) -> str:
        """How the entry shows in Load Video LLM's model list before it is downloaded."""
        return f"{DOWNLOAD_MARK} {self.repo_id} ({self.disk_gb:.1f} GB)"


DOWNLOAD_MARK = "\u2b07"  # ⬇

CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava_onevision", 1.8, 3.5, 2.5),
    CatalogEntry("llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava_onevision", 16.1, 18.0, 7.0),
    CatalogEntry("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl", 7.5, 9.0, 4.0),
    CatalogEntry("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", 16.6, 18.5, 7.0),
    CatalogEntry("Qwen/Qwen3-VL-2B-Instruct", "qwen3_vl", 4.3, 6.0, 3.0),
    CatalogEntry("Qwen/Qwen3-VL-4B-Instruct", "qwen3_vl", 8.9, 10.5, 4.5),
    CatalogEntry("Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl", 17.5, 19.5, 7.5),
    # Qwen3.5 / Qwen3.6 (hybrid Gated DeltaNet + gated attention) and the Qwen3-VL MoE.
    # GPU memory: transformers' parameters x 2 bytes (4-bit: nf4 for every nn.Linear weight outside
    # model.visual and lm_head, the rest at bf16), + 1.5 GB; tests/test_catalog_estimates.py recomputes
    # them from the configs on the meta device. Disk: the Qwen3.5/3.6 checkpoints also hold a
    # multi-token-prediction layer (mtp.*) that transformers skips, so disk can exceed the bf16 weights.
    # Disk estimated from the parameter count (+ MTP), no file list found:
    CatalogEntry("Qwen/Qwen3.5-0.8B", "qwen3_5", 1.8, 3.2, 2.5),
    # Disk estimated as above; the 2B's vision tower is assumed to be the 4B's (its config was not found):
    CatalogEntry("Qwen/Qwen3.5-2B", "qwen3_5", 4.6, 5.9, 3.9),
    # Disk read: shards of 5,329,398,688 + 3,990,429,408 bytes.
    CatalogEntry("Qwen/Qwen3.5-4B", "qwen3_5", 9.3, 10.6, 5.2),
    # Disk read: Hugging Face file list, 4 shards of 5.28 + 5.34 + 5.37 + 3.33 GB.
    CatalogEntry("Qwen/Qwen3.5-9B", "qwen3_5", 19.3, 20.3, 10.0),
    # The dense 27B (64 layers, 5120 wide; Qwen3.6-27B has the same config.json shapes): 27.36 B parameters
    # on the meta device. Disk estimated from that count + the MTP layer (0.42 B) at bf16, no file list found.
    CatalogEntry("Qwen/Qwen3.5-27B", "qwen3_5", 55.6, 56.2, 19.7),
    CatalogEntry("Qwen/Qwen3.6-27B", "qwen3_5", 55.6, 56.2, 19.7),
    # MoE: transformers 5 stores the experts as fused 3-D parameters, which bitsandbytes does not
    # quantize (it replaces nn.Linear layers only), so 4-bit saves only the attention and shared-expert
    # projections: about 2 GB of 70. Disk estimated from the parameter count (+ MTP); third-party
    # cards give 72 GB (67 GiB) for the bf16 checkpoint.
    CatalogEntry("Qwen/Qwen3.5-35B-A3B", "qwen3_5_moe", 71.9, 71.7, 69.6),
    CatalogEntry("Qwen/Qwen3.6-35B-A3B", "qwen3_5_moe", 71.9, 71.7, 69.6),  # same shapes as Qwen3.5-35B-A3B
    # Disk read: 13 shards, 31,070,754,032 bf16 parameters. 4-bit: experts stay bf16, as above.
    CatalogEntry("Qwen/Qwen3-VL-30B-A3B-Instruct", "qwen3_vl_moe", 62.1, 63.6, 62.3),
)


def _extra_entries() -> tuple[CatalogEntry, ...]:
    path = os.environ.get(EXTRA_CATALOG_ENV)
    if not path:
        return ()
    try:
        items = json.loads(Path(path).expanduser().read_text())
        names = {f.name for f in fields(CatalogEntry)}
        return tuple(CatalogEntry(**{k: v for k, v in item.items() if k in names}) for item in items)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        # The node list must still build: a broken extra catalog only loses its own entries.
        log.warning("%s=%s is not a JSON list of catalog entries (%s); ignoring it", EXTRA_CATALOG_ENV, path, exc)
        return ()


def catalog() -> tuple[CatalogEntry, ...]:
    """The built-in entries, then those of $ADATP_EXTRA_CATALOG (if set)."""
    entries = {e.repo_id: e for e in (*CATALOG, *_extra_entries())}
    return tuple(entries.values())


def find_entry(repo_id: str) -> CatalogEntry | None:
    return next((e for e in catalog() if e.repo_id == repo_id), None)


def entry_from_label(label: str) -> CatalogEntry | None:
    """The entry a model-list value names: "⬇ owner/name (size)", or None.

    Only the repo id counts, so a saved workflow stays valid when a size figure
    is revised.
    """
    if not label.startswith(DOWNLOAD_MARK):
        return None
    words = label[len(DOWNLOAD_MARK):].split()
    return find_entry(words[0]) if words else None
