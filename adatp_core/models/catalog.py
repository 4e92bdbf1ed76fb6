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
