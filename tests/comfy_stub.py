"""A small stand-in for ComfyUI's model management, for tests without ComfyUI.

It keeps the contract that comfy.model_management and comfy.model_patcher have
with a ModelPatcher: ``current_loaded_models`` holds LoadedModel records that
refer to the patcher and its model only weakly; ``load_models_gpu`` loads a
patcher through ``partially_load``; ``free_memory`` (and ``unload_all_models``,
what "Unload models" and "Free memory" call) unloads through
``partially_unload``/``detach``; records of models that were garbage collected
are dropped. Written from ComfyUI's behaviour, not copied from it.
"""

from __future__ import annotations

import threading
import types
import uuid
import weakref

import torch


def make_comfy(load_device: torch.device, offload_device: torch.device):
    """Returns (model_management, model_patcher) modules for one test."""
    mm = types.ModuleType("comfy.model_management")
    mp = types.ModuleType("comfy.model_patcher")
    mm.current_loaded_models = []

    def module_size(module):
        return sum(t.numel() * t.element_size() for t in module.state_dict().values())

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
            self.parent = None
            self.patches_uuid = uuid.uuid4()
            if getattr(model, "device", None) is None:
                model.device = offload_device
            for name, value in (("model_loaded_weight_memory", 0), ("lowvram_patch_counter", 0),
                                ("model_lowvram", False), ("current_weight_patches_uuid", None)):
                if not hasattr(model, name):
                    setattr(model, name, value)

        def model_size(self):
            self.size = self.size or module_size(self.model)
            return self.size

        def loaded_size(self):
            return self.model.model_loaded_weight_memory

        def current_loaded_device(self):
            return self.model.device

        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
            raise AssertionError("the real ModelPatcher.load loads module by module; a subclass must override it")

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            if self.model.model_loaded_weight_memory > 0 and not self.model.model_lowvram:
                return 0
            before = self.model.model_loaded_weight_memory
            self.load(device_to, lowvram_model_memory=before + extra_memory, full_load=extra_memory > self.size)
            return self.model.model_loaded_weight_memory - before

        def partially_unload(self, device_to, memory_to_free=0):
            raise AssertionError("the real partially_unload only frees ComfyUI's own layers; override it")

        def detach(self, unpatch_all=True):
            if unpatch_all:
                self.model.to(self.offload_device)
                self.model.device = self.offload_device
                self.model.model_loaded_weight_memory = 0
            return self.model

    class LoadedModel:
        def __init__(self, patcher):
            self._model = weakref.ref(patcher)
            self.device = patcher.load_device
            self.real_model = None
            self.finalizer = None

        @property
        def model(self):
            return self._model()

        def model_load(self):
            self.model.partially_load(self.device, 1e32)
            self.real_model = weakref.ref(self.model.model)
            self.finalizer = weakref.finalize(self.model.model, cleanup_models)

        def model_unload(self, memory_to_free=None):
            if memory_to_free is not None and memory_to_free < self.model.loaded_size():
                if self.model.partially_unload(self.model.offload_device, memory_to_free) >= memory_to_free:
                    return False
            self.model.detach(True)
            self.finalizer.detach()
            self.real_model = None
            return True

        def __eq__(self, other):
            return self.model is other.model

    def cleanup_models():
        mm.current_loaded_models[:] = [m for m in mm.current_loaded_models
                                       if m.real_model is not None and m.real_model() is not None]

    def free_memory(memory_required, device, keep_loaded=()):
        unloaded = []
        for m in list(mm.current_loaded_models):
            if m.device == device and m not in keep_loaded and m.model_unload(memory_required):
                mm.current_loaded_models.remove(m)
                unloaded.append(m)
        return unloaded

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        for patcher in models:
            record = LoadedModel(patcher)
            if record in mm.current_loaded_models:
                record = mm.current_loaded_models.pop(mm.current_loaded_models.index(record))
                # As ComfyUI does (model_management.load_models_gpu): a loaded model is its own
                # clone, detached without unpatching before it is loaded again, on every call.
                record.model.detach(unpatch_all=False)
            record.model_load()
            mm.current_loaded_models.insert(0, record)

    mm.module_size = module_size
    mm.LoadedModel = LoadedModel
    mm.cleanup_models = cleanup_models
    mm.free_memory = free_memory
    mm.load_models_gpu = load_models_gpu
    mm.unload_all_models = lambda: free_memory(1e30, load_device)
    mm.get_torch_device = lambda: load_device
    mm.unet_offload_device = lambda: offload_device
    mm.soft_empty_cache = lambda force=False: None
    make_interrupts(mm)
    mp.ModelPatcher = ModelPatcher
    return mm, mp


def make_interrupts(mm=None):
    """ComfyUI's Cancel flag on ``mm`` (a new comfy.model_management module when None):
    ``interrupt_current_processing(True)`` is what POST /interrupt calls, from the server's
    thread; ``throw_exception_if_processing_interrupted`` raises InterruptProcessingException
    and clears the flag, from whichever thread calls it. Written from its behaviour."""
    mm = mm or types.ModuleType("comfy.model_management")
    lock, flag = threading.RLock(), [False]

    class InterruptProcessingException(Exception):
        pass

    def interrupt_current_processing(value=True):
        with lock:
            flag[0] = value

    def processing_interrupted():
        with lock:
            return flag[0]

    def throw_exception_if_processing_interrupted():
        with lock:
            if flag[0]:
                flag[0] = False
                raise InterruptProcessingException()

    mm.InterruptProcessingException = InterruptProcessingException
    mm.interrupt_current_processing = interrupt_current_processing
    mm.processing_interrupted = processing_interrupted
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    return mm


def make_folder_paths(base):
    """A folder_paths module for one test: input/output/temp folders and models_dir under
    ``base``, ``add_model_folder_path`` and ``get_folder_paths`` (KeyError for a name never
    added), as ComfyUI's folder_paths behaves. Written from its behaviour, not copied from it."""
    import os

    fp = types.ModuleType("folder_paths")
    base = os.path.abspath(str(base))
    fp.models_dir = os.path.join(base, "models")
    fp.folder_names_and_paths = {}
    fp.get_input_directory = lambda: os.path.join(base, "input")
    fp.get_output_directory = lambda: os.path.join(base, "output")
    fp.get_temp_directory = lambda: os.path.join(base, "temp")

    def add_model_folder_path(name, path, is_default=False):
        paths, _ = fp.folder_names_and_paths.setdefault(name, ([], set()))
        if path in paths:
            paths.remove(path)
        paths.insert(0, path) if is_default else paths.append(path)

    def get_folder_paths(name):
        return list(fp.folder_names_and_paths[name][0])

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = get_folder_paths
    return fp


def validate_node(node_class, inputs: dict) -> tuple[list[str], dict]:
    """What ComfyUI's prompt validation (execution.validate_inputs) does with one node of an
    API-format prompt, written from its behaviour, not copied from it. ``inputs``: the node's
    inputs as a client sent them; a value of the form [node_id, slot] is a link.

    Literal INT, FLOAT and STRING values are converted with int(), float() and str(), and
    nothing else is: a literal in a socket input (ADATP_MODEL, IMAGE...) passes as it is.
    The widget's min and max and a combo's choices are checked, except for the inputs that
    VALIDATE_INPUTS names (all of them when it takes **kwargs). VALIDATE_INPUTS then gets the
    literal values it names (a linked one is left out). Returns (errors, the inputs after
    conversion): with no errors, ComfyUI calls the node's function with them (links resolved).
    """
    import inspect

    spec = node_class.INPUT_TYPES()
    declared = {**spec.get("required", {}), **spec.get("optional", {})}
    named, any_name = [], False
    if hasattr(node_class, "VALIDATE_INPUTS"):
        argspec = inspect.getfullargspec(node_class.VALIDATE_INPUTS)
        named, any_name = argspec.args[1:], argspec.varkw is not None
    errors, values, literals = [], dict(inputs), {}
    for name, (kind, *rest) in declared.items():
        if name not in inputs:
            if name in spec.get("required", {}):
                errors.append(f"{name}: required input is missing")
            continue
        value = inputs[name]
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
            continue  # a link: its type is checked against the other node's output, not here
        convert = {"INT": int, "FLOAT": float, "STRING": str}.get(kind) if isinstance(kind, str) else None
        if convert is not None:
            try:
                value = convert(value)
            except Exception as exc:  # noqa: BLE001  ComfyUI reports any failure to convert
                errors.append(f"{name}: cannot convert {value!r} to {kind} ({exc})")
                continue
        values[name] = literals[name] = value
        options = rest[0] if rest else {}
        if name not in named and not any_name:
            if "min" in options and value < options["min"]:
                errors.append(f"{name}: {value} is smaller than min of {options['min']}")
            elif "max" in options and value > options["max"]:
                errors.append(f"{name}: {value} is bigger than max of {options['max']}")
            elif isinstance(kind, (list, tuple)) and value not in kind:
                errors.append(f"{name}: {value!r} is not in the list")
    if named or any_name:
        answer = node_class.VALIDATE_INPUTS(**{k: v for k, v in literals.items() if any_name or k in named})
        if answer is not True:
            errors.append(f"custom validation failed: {answer}")
    return errors, values
