"""Run a UI-format ComfyUI workflow file in-process, without ComfyUI.

It executes the pack's nodes plus the few core display nodes that the shipped
workflows use (Preview Image and Save Image write PNG files; Preview Any prints
text; Note and Markdown Note are skipped). Bypassed nodes (mode 4) pass their
inputs through, as in ComfyUI; muted nodes (mode 2) do not run. Problems with
the file are reported by ``WorkflowError`` naming the node: an unknown node
type, a missing or dangling link, a type mismatch, or a widget-count mismatch.
Before anything runs, each node's VALIDATE_INPUTS gets the literal values it names, as
ComfyUI's prompt validation does, and a refusal is a ``WorkflowError`` naming the node.
An override replaces a value or a link, as a literal in an API-format prompt does.
It can also convert the file to ComfyUI's API format for POST /prompt.
"""

from __future__ import annotations

import inspect
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import comfy_bridge as bridge

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
VIRTUAL_NODES = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "file_upload")
MODE_MUTED, MODE_BYPASSED = 2, 4


class WorkflowError(ValueError):
    """The workflow file cannot run as it is; the message names the node."""


def write_png(path: Path, image: np.ndarray) -> Path:
    """uint8 [H, W, 3] -> a PNG file (no imaging library needed)."""
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    path.write_bytes(png)
    return path


def _image_to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    return [(img.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy() for img in images]


class _SaveImages:
    """Preview Image / Save Image: write the batch as PNG files into the output directory."""

    FUNCTION = "save"
    OUTPUT_NODE = True
    prefix = "ComfyUI"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "optional": {"filename_prefix": ("STRING", {"default": cls.prefix})}}

    def save(self, images, filename_prefix=None, _node_id="0"):
        out = bridge.output_directory()
        out.mkdir(parents=True, exist_ok=True)
        stem = (filename_prefix or self.prefix).replace("/", "_").replace("\\", "_")
        paths = [write_png(out / f"{stem}_{_node_id}_{k:03d}.png", img) for k, img in enumerate(_image_to_uint8(images))]
        return {"ui": {"images": [str(p) for p in paths]}}


class PreviewImage(_SaveImages):
    prefix = "preview"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}


class SaveImage(_SaveImages):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}


class PreviewAny:
    FUNCTION = "show"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"source": ("*",)}}

    def show(self, source=None, _node_id="0"):
        return {"ui": {"text": [source if isinstance(source, str) else json.dumps(source, default=str)]}}


class VideoFromFile:
    """A stand-in for ComfyUI's VideoFromFile (comfy_api.input_impl), as far as the pack uses it:
    a VIDEO backed by a path or a BytesIO, whose frames are decoded only when asked for."""

    def __init__(self, file):
        self._file = file

    def get_stream_source(self):
        if hasattr(self._file, "seek"):
            self._file.seek(0)
        return self._file

    def get_dimensions(self) -> tuple[int, int]:
        from ..adatp_core.video import open_container

        with open_container(self.get_stream_source()) as container:
            stream = container.streams.video[0]
            return stream.width, stream.height

    def get_components(self):
        """Every frame, [T, H, W, 3] float 0..1, and the average frame rate (as ComfyUI's does)."""
        from fractions import Fraction
        from types import SimpleNamespace

        from ..adatp_core.video import open_container

        with open_container(self.get_stream_source()) as container:
            stream = container.streams.video[0]
            frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
            rate = Fraction(stream.average_rate) if stream.average_rate else Fraction(1)
        images = torch.stack(frames).float() / 255 if frames else torch.zeros(0, 0, 0, 3)
        return SimpleNamespace(images=images, frame_rate=rate, audio=None, metadata=None)


class LoadVideo:
    """Core Load Video: a video from the input folder as a VIDEO (a VideoFromFile stand-in)."""

    FUNCTION = "load"
    RETURN_TYPES = ("VIDEO",)
    RETURN_NAMES = ("VIDEO",)

    @classmethod
    def INPUT_TYPES(cls):
        from .load_video import list_videos

        return {"required": {"file": (list_videos(), {"video_upload": True})}}

    def load(self, file):
        from .load_video import resolve_video

        return (VideoFromFile(str(resolve_video(file))),)


CORE_DISPLAY_NODES = {"PreviewImage": PreviewImage, "SaveImage": SaveImage, "PreviewAny": PreviewAny}
# Core nodes that shipped workflows start from, run by stand-ins when ComfyUI is absent.
CORE_NODES = {**CORE_DISPLAY_NODES, "LoadVideo": LoadVideo}


def _inputs(cls) -> list[tuple[str, tuple]]:
    spec = cls.INPUT_TYPES()
    return [*spec.get("required", {}).items(), *spec.get("optional", {}).items()]


def is_widget(spec: tuple) -> bool:
    kind = spec[0]
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def widget_slots(cls) -> list[tuple[str, str | None]]:
    """Positions in ``widgets_values``: (input name, None) for a widget's own value,
    (input name, "control") for a seed's control_after_generate, right after the
    seed, and (input name, "upload") for an upload button, after every other
    widget: the order in which ComfyUI's frontend creates and saves them."""
    slots, uploads = [], []
    for name, spec in _inputs(cls):
        if not is_widget(spec):
            continue
        opts = spec[1] if len(spec) > 1 else {}
        slots.append((name, None))
        if spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
            slots.append((name, "control"))
        if any(opts.get(flag) for flag in UPLOAD_FLAGS):
            uploads.append((name, "upload"))
    return slots + uploads


def _default(spec: tuple):
    """A widget's default value: its declared default, else a combo's first choice."""
    opts = spec[1] if len(spec) > 1 else {}
    if "default" in opts:
        return opts["default"]
    return spec[0][0] if isinstance(spec[0], (list, tuple)) and spec[0] else None


def _saved_default(spec: tuple):
    """What a workflow saved before this optional widget existed gets: its "saved_default" where the
    node declares one (the behaviour from before the input; web/adatp.js does the same in ComfyUI),
    else its default."""
    opts = spec[1] if len(spec) > 1 else {}
    return opts["saved_default"] if "saved_default" in opts else _default(spec)


def _input_type(spec: tuple) -> str:
    return "COMBO" if isinstance(spec[0], (list, tuple)) else spec[0]


@dataclass
class RunResult:
    outputs: dict = field(default_factory=dict)  # node id -> tuple of outputs
    ui: dict = field(default_factory=dict)  # node id -> ui dict
    order: list = field(default_factory=list)  # node ids in execution order
    labels: dict = field(default_factory=dict)  # node id -> "#id (title)"

    def texts(self) -> list[tuple[int, str]]:
        return [(nid, t) for nid in self.order for t in self.ui.get(nid, {}).get("text", [])]

    def images(self) -> list[str]:
        return [p for nid in self.order for p in self.ui.get(nid, {}).get("images", [])]


class Workflow:
    """A parsed UI-format workflow, checked against the node classes."""

    def __init__(self, data: dict, mappings: dict):
        if not isinstance(data, dict) or "nodes" not in data:
            raise WorkflowError("this is not a UI-format ComfyUI workflow (no 'nodes'); "
                                "save it with Workflow > Save, not Export (API)")
        self.mappings = {**CORE_NODES, **mappings}
        self.nodes = {int(n["id"]): n for n in data["nodes"] if n.get("type") not in VIRTUAL_NODES}
        self.links = {}
        for link in data.get("links", []):
            link_id, src, src_slot, dst, dst_slot, kind = (link["id"], link["origin_id"], link["origin_slot"],
                                                           link["target_id"], link["target_slot"], link["type"]) \
                if isinstance(link, dict) else link[:6]
            self.links[int(link_id)] = (int(src), int(src_slot), int(dst), int(dst_slot), kind)
        for nid, node in self.nodes.items():
            if node.get("type") not in self.mappings:
                raise WorkflowError(f"node {self.label(nid)}: unknown node type {node.get('type')!r}; "
                                    "install the custom node pack that provides it")
            self._check_node(nid, node)

    def label(self, nid: int) -> str:
        node = self.nodes.get(nid, {})
        title = node.get("title") or node.get("type", "?")
        return f"#{nid} ({title})"

    def _check_node(self, nid: int, node: dict) -> None:
        cls = self.mappings[node["type"]]
        slots = widget_slots(cls)
        values = node.get("widgets_values") or []
        if isinstance(values, dict):  # some frontends save {name: value}
            values = [values.get(name) for name, extra in slots if extra is None]
            slots = [(name, None) for name, extra in slots if extra is None]
            node["widgets_values"] = values
        optional = cls.INPUT_TYPES().get("optional", {})
        missing = slots[len(values):]
        if missing and all(extra is None and name in optional for name, extra in missing):
            # saved before these optional widgets were appended: they take their defaults, as in ComfyUI
            values = list(values) + [_saved_default(optional[name]) for name, _ in missing]
            node["widgets_values"] = values
        if len(values) != len(slots):
            names = ", ".join(name + (f" ({extra})" if extra else "") for name, extra in slots)
            raise WorkflowError(
                f"node {self.label(nid)}: {len(values)} widget values saved, but {node['type']} has "
                f"{len(slots)} widget slots ({names}); the workflow was saved with another version of the node")
        declared = dict(_inputs(cls))
        for inp in node.get("inputs", []):
            link = inp.get("link")
            if inp["name"] not in declared:
                raise WorkflowError(f"node {self.label(nid)}: input {inp['name']!r} does not exist on {node['type']}")
            if link is None:
                continue
            if link not in self.links:
                raise WorkflowError(f"node {self.label(nid)}: input {inp['name']!r} uses link {link}, "
                                    "which is not in the file")
            src, src_slot, _dst, _slot, kind = self.links[link]
            if src not in self.nodes:
                raise WorkflowError(f"node {self.label(nid)}: input {inp['name']!r} comes from node {src}, "
                                    "which is not in the file")
            expected = _input_type(declared[inp["name"]])
            src_cls = self.mappings[self.nodes[src]["type"]]
            returned = getattr(src_cls, "RETURN_TYPES", ())
            if src_slot >= len(returned):
                raise WorkflowError(f"node {self.label(nid)}: input {inp['name']!r} comes from output "
                                    f"{src_slot} of {self.label(src)}, which has {len(returned)} outputs")
            actual = returned[src_slot]
            if expected not in ("*", actual) and not (expected == "COMBO" and actual == "STRING"):
                raise WorkflowError(f"node {self.label(nid)}: input {inp['name']!r} wants {expected} but is "
                                    f"linked to {actual} from {self.label(src)}")

    def bindings(self, nid: int) -> tuple[dict, dict]:
        """(widget values by name, links by input name) of one node."""
        node = self.nodes[nid]
        cls = self.mappings[node["type"]]
        widgets = {name: value for (name, extra), value in zip(widget_slots(cls), node.get("widgets_values") or [])
                   if extra is None}
        linked = {inp["name"]: inp["link"] for inp in node.get("inputs", []) if inp.get("link") is not None}
        for name, spec in cls.INPUT_TYPES().get("required", {}).items():
            if not is_widget(spec) and name not in linked:
                raise WorkflowError(f"node {self.label(nid)}: required input {name!r} is not connected")
        return widgets, linked

    def output_nodes(self) -> list[int]:
        return [nid for nid, n in self.nodes.items()
                if getattr(self.mappings[n["type"]], "OUTPUT_NODE", False) and n.get("mode", 0) != MODE_MUTED]

    def execution_order(self) -> list[int]:
        order, state = [], {}

        def visit(nid: int, path: tuple):
            if state.get(nid) == "done":
                return
            if state.get(nid) == "visiting":
                raise WorkflowError(f"node {self.label(nid)} is part of a cycle")
            if self.nodes[nid].get("mode", 0) == MODE_MUTED:
                raise WorkflowError(f"node {self.label(nid)} is muted, but {self.label(path[-1])} needs its output")
            state[nid] = "visiting"
            for link in self.bindings(nid)[1].values():
                visit(self.links[link][0], path + (nid,))
            state[nid] = "done"
            order.append(nid)

        for nid in sorted(self.output_nodes()):
            visit(nid, (nid,))
        return order

    def to_api(self) -> dict:
        """ComfyUI's API format ({id: {class_type, inputs}}), as the frontend sends to POST /prompt."""
        prompt = {}
        for nid, node in self.nodes.items():
            if node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
                continue
            widgets, linked = self.bindings(nid)
            inputs = dict(widgets)
            for name, link in linked.items():
                src, src_slot = self.links[link][:2]
                while self.nodes[src].get("mode", 0) == MODE_BYPASSED:  # follow bypassed nodes upstream
                    src, src_slot = self._bypass_source(src, src_slot)
                inputs[name] = [str(src), src_slot]
            prompt[str(nid)] = {"class_type": node["type"], "inputs": inputs}
        return prompt

    def _bypass_source(self, nid: int, slot: int) -> tuple[int, int]:
        kind = self.mappings[self.nodes[nid]["type"]].RETURN_TYPES[slot]
        for inp in self.nodes[nid].get("inputs", []):
            if inp.get("link") is not None and inp.get("type") == kind:
                return self.links[inp["link"]][:2]
        raise WorkflowError(f"node {self.label(nid)} is bypassed but has no {kind} input to pass through")


def run_workflow(data: dict | str | Path, mappings: dict, overrides: dict | None = None, log=print) -> RunResult:
    """Execute a UI-format workflow. ``overrides``: {(node_id, input_name): value}."""
    if not isinstance(data, dict):
        path = Path(data)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WorkflowError(f"{path} cannot be read as a workflow ({exc})") from exc
    wf = Workflow(data, mappings)
    result = RunResult()
    order = wf.execution_order()
    literals = {nid: _literals(wf, nid, overrides or {}) for nid in order}
    for nid in order:
        _validate(wf, nid, literals[nid])
    for nid in order:
        node = wf.nodes[nid]
        cls = wf.mappings[node["type"]]
        kwargs = dict(literals[nid])
        for name, link in wf.bindings(nid)[1].items():
            if name not in kwargs:
                src, src_slot = wf.links[link][:2]
                kwargs[name] = result.outputs[src][src_slot]
        if node.get("mode", 0) == MODE_BYPASSED:
            passed = []
            for kind in getattr(cls, "RETURN_TYPES", ()):
                match = [i for i in node.get("inputs", []) if i.get("type") == kind and i.get("link") is not None]
                passed.append(kwargs[match[0]["name"]] if match else None)
            result.outputs[nid] = tuple(passed)
            result.order.append(nid)
            log(f"[{nid}] {node['type']}: bypassed")
            continue
        if cls in CORE_DISPLAY_NODES.values():
            kwargs["_node_id"] = str(nid)
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
        if isinstance(out, dict):
            result.ui[nid] = out.get("ui", {})
            out = out.get("result", ())
        result.outputs[nid] = tuple(out or ())
        result.order.append(nid)
        result.labels[nid] = wf.label(nid)
        log(f"[{nid}] {node['type']}: done")
    return result


def _literals(wf: Workflow, nid: int, overrides: dict) -> dict:
    """A node's literal inputs: its widget values, and the overrides, which replace widget values
    and links alike (a literal where the API format expects a link)."""
    values = dict(wf.bindings(nid)[0])
    values.update({name: value for (onid, name), value in overrides.items() if onid == nid})
    return values


def _validate(wf: Workflow, nid: int, literals: dict) -> None:
    """ComfyUI's call of VALIDATE_INPUTS: the literal values it names (a link is not passed), and
    a refusal (anything but True) is the node's error. Bypassed nodes are not in the prompt."""
    node = wf.nodes[nid]
    check = getattr(wf.mappings[node["type"]], "VALIDATE_INPUTS", None)
    if check is None or node.get("mode", 0) == MODE_BYPASSED:
        return
    spec = inspect.getfullargspec(check)
    named = {k: v for k, v in literals.items() if spec.varkw is not None or k in spec.args}
    answer = check(**named)
    if answer is not True:
        raise WorkflowError(f"node {wf.label(nid)}: {answer if isinstance(answer, str) else 'its inputs are refused'}")
