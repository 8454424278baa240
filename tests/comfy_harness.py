"""A stand-in for ComfyUI's executor, for testing custom nodes without ComfyUI (which is not on our registry).

Written from ComfyUI's own source (comfyanonymous/ComfyUI), and doing what it does for "V1" nodes:

- loading: ``nodes.load_custom_node`` (``spec_from_file_location(<folder name>, <folder>/__init__.py)``,
  registered in ``sys.modules`` under the folder's name, then ``NODE_CLASS_MAPPINGS`` read);
- validation: ``execution.validate_prompt`` / ``validate_inputs`` (``get_input_info`` of
  ``comfy_execution/graph.py``; ``validate_node_input`` of ``comfy_execution/validation.py``): every
  required input present; a link is ``[node_id, output_index]`` whose type matches; constants converted
  with ``int``/``float``/``str``/``bool`` for INT/FLOAT/STRING/BOOLEAN; ``min``/``max`` checked; a
  choice must be in its list; ``VALIDATE_INPUTS`` consulted (and then replaces the min/max checks of the
  inputs it takes); a prompt needs an ``OUTPUT_NODE``;
- execution: ``execution.execute`` / ``get_input_data`` / ``_async_map_node_over_list`` /
  ``merge_result_data`` under ``torch.inference_mode()``: one instance per node, ``FUNCTION`` called with
  keyword arguments (optional inputs only when given; hidden PROMPT / UNIQUE_ID / EXTRA_PNGINFO), inputs
  as lists mapped over (``INPUT_IS_LIST`` aside), the interrupt checked before each call
  (``nodes.before_node_execution``), the result a tuple (or a dict with ``ui`` / ``result``), outputs
  cached by input signature across prompts (``CacheKeySetInputSignature``; ``IS_CHANGED`` is not
  consulted).

Stricter than ComfyUI on purpose: a node's result must be a tuple with one value per ``RETURN_TYPES``
entry, and IMAGE / MASK values must follow ComfyUI's conventions (float (B, H, W, 3) / (B, H, W) in
[0, 1]), so that a node breaking them fails here rather than in a user's graph.

``core_nodes`` gives stand-ins for ComfyUI's LoadImage and SaveImage with their contract
(``nodes.py``), so that workflows written for ComfyUI run as they are. ``FakeComfy`` installs fake
``comfy.model_management`` / ``comfy.utils`` modules that record progress and can simulate Cancel.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

PRIMITIVES = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


class PromptError(Exception):
    """Validation failed; ``errors`` holds ComfyUI-shaped error dicts (type, message, details, node)."""

    def __init__(self, errors: list[dict]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['node']}: {e['type']} ({e['details']})" for e in errors))


class NodeError(Exception):
    """A node raised while executing (ComfyUI reports this as ``execution_error``)."""

    def __init__(self, node_id: str, class_type: str, error: BaseException) -> None:
        self.node_id, self.class_type, self.error = node_id, class_type, error
        super().__init__(f"node {node_id} ({class_type}): {type(error).__name__}: {error}")


# ---------------------------------------------------------------------------------------------- loading
def load_custom_node(folder: str | Path, module_name: str | None = None) -> types.ModuleType:
    """Import a custom-node folder the way ComfyUI does; returns the module."""
    folder = Path(folder)
    name = module_name or folder.name
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    check_mappings(module)
    return module


def check_mappings(module: types.ModuleType) -> None:
    """What ComfyUI needs of every registered class (``/object_info`` reads all of it)."""
    mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
    if not isinstance(mappings, dict) or not mappings:
        raise TypeError("a custom-node package must define a non-empty NODE_CLASS_MAPPINGS dict")
    for key, cls in mappings.items():
        inputs = cls.INPUT_TYPES()
        if not isinstance(inputs, dict) or set(inputs) - {"required", "optional", "hidden"}:
            raise TypeError(f"{key}.INPUT_TYPES() must be a dict of required/optional/hidden")
        for category in ("required", "optional"):
            for name, spec in inputs.get(category, {}).items():
                if (
                    not isinstance(spec, tuple)
                    or not 1 <= len(spec) <= 2
                    or not isinstance(spec[0], (str, list))
                ):
                    raise TypeError(f"{key} input {name!r}: want (type,) or (type, options), got {spec!r}")
                options = spec[1] if len(spec) == 2 else {}
                if isinstance(spec[0], list) and "default" in options and options["default"] not in spec[0]:
                    raise TypeError(
                        f"{key} input {name!r}: default {options['default']!r} not in its choices"
                    )
        if not isinstance(cls.RETURN_TYPES, tuple):
            raise TypeError(f"{key}.RETURN_TYPES must be a tuple")
        names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
        if len(names) != len(cls.RETURN_TYPES):
            raise TypeError(f"{key}.RETURN_NAMES must have one name per RETURN_TYPES entry")
        if not callable(getattr(cls, cls.FUNCTION, None)):
            raise TypeError(f"{key}.FUNCTION names {cls.FUNCTION!r}, which is not a method")
        if not isinstance(getattr(cls, "CATEGORY", None), str):
            raise TypeError(f"{key}.CATEGORY must be a str")


# ---------------------------------------------------------------------------------------------- validation
def input_info(cls: type, name: str) -> tuple[Any, str | None, dict]:
    """(type, category, options) of input ``name`` (``comfy_execution.graph.get_input_info``)."""
    valid = cls.INPUT_TYPES()
    for category in ("required", "optional", "hidden"):
        if name in valid.get(category, {}):
            spec = valid[category][name]
            if category == "hidden":
                return spec, category, {}
            return spec[0], category, spec[1] if len(spec) > 1 else {}
    return None, None, {}


def types_match(received: str, wanted: str) -> bool:
    """``validate_node_input`` (non-strict): equal, or comma-separated unions that overlap; "*" matches."""
    if received == wanted or "*" in (received, wanted):
        return True
    if not isinstance(received, str) or not isinstance(wanted, str):
        return False
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in wanted.split(",")})


def _error(node: str, kind: str, message: str, details: str, name: str | None = None) -> dict:
    return {"node": node, "type": kind, "message": message, "details": details, "input_name": name}


def _check_constant(node: str, name: str, kind: Any, options: dict, value: Any, skip_range: bool):
    """Convert and check one constant input; returns (value, error or None)."""
    if isinstance(value, dict) and "__value__" in value:
        value = value["__value__"]
    if isinstance(kind, str) and kind in PRIMITIVES:
        try:
            value = PRIMITIVES[kind](value)
        except (TypeError, ValueError) as err:
            return value, _error(
                node, "invalid_input_type", f"cannot convert to {kind}", f"{name}, {err}", name
            )
    if skip_range:
        return value, None
    if "min" in options and value < options["min"]:
        return value, _error(node, "value_smaller_than_min", f"{value} < min {options['min']}", name, name)
    if "max" in options and value > options["max"]:
        return value, _error(node, "value_bigger_than_max", f"{value} > max {options['max']}", name, name)
    if isinstance(kind, list) and value not in kind:
        return value, _error(
            node, "value_not_in_list", "value not in list", f"{name}: {value!r} not in {kind}", name
        )
    return value, None


def validate_node(prompt: dict, node: str, mappings: dict, done: dict) -> list[dict]:
    """The errors of ``node`` and of the nodes it links from (``execution.validate_inputs``)."""
    if node in done:
        return []
    done[node] = True
    cls = mappings[prompt[node]["class_type"]]
    inputs = prompt[node]["inputs"]
    valid = cls.INPUT_TYPES()
    custom = getattr(cls, "VALIDATE_INPUTS", None)
    custom_args = set(custom.__code__.co_varnames[: custom.__code__.co_argcount]) if custom else set()
    errors = []
    for name in [*valid.get("required", {}), *valid.get("optional", {})]:
        kind, category, options = input_info(cls, name)
        if name not in inputs:
            if category == "required":
                errors.append(_error(node, "required_input_missing", "required input is missing", name, name))
            continue
        value = inputs[name]
        if isinstance(value, list):
            if len(value) != 2 or value[0] not in prompt:
                errors.append(_error(node, "bad_linked_input", "want [node_id, output_index]", name, name))
                continue
            source = mappings[prompt[value[0]]["class_type"]]
            if not isinstance(value[1], int) or not 0 <= value[1] < len(source.RETURN_TYPES):
                errors.append(_error(node, "bad_linked_input", "no such output", f"{name}: {value}", name))
                continue
            received = source.RETURN_TYPES[value[1]]
            if not types_match(received, kind):
                details = f"{name}, received_type({received}) mismatch input_type({kind})"
                errors.append(_error(node, "return_type_mismatch", "return type mismatch", details, name))
                continue
            errors += validate_node(prompt, value[0], mappings, done)
        else:
            inputs[name], error = _check_constant(node, name, kind, options, value, name in custom_args)
            if error:
                errors.append(error)
    if custom and not errors:
        arguments = {k: v for k, v in inputs.items() if k in custom_args and not isinstance(v, list)}
        verdict = custom(**arguments)
        if verdict is not True:
            errors.append(_error(node, "custom_validation_failed", "VALIDATE_INPUTS failed", str(verdict)))
    return errors


def validate_prompt(prompt: dict, mappings: dict) -> list[str]:
    """Check a prompt (API format: {id: {"class_type", "inputs"}}); returns its output node ids."""
    for node, entry in prompt.items():
        if "class_type" not in entry:
            raise PromptError([_error(node, "invalid_prompt", "node has no class_type", node)])
        if entry["class_type"] not in mappings:
            raise PromptError([_error(node, "invalid_prompt", "no such node", entry["class_type"])])
    outputs = [
        n for n, e in prompt.items() if getattr(mappings[e["class_type"]], "OUTPUT_NODE", False) is True
    ]
    if not outputs:
        raise PromptError([_error("", "prompt_no_outputs", "prompt has no outputs", "")])
    done: dict = {}
    errors = [e for node in outputs for e in validate_node(prompt, node, mappings, done)]
    if errors:
        raise PromptError(errors)
    return outputs


# ---------------------------------------------------------------------------------------------- execution
def check_value(kind: str, value: Any, where: str) -> None:
    """ComfyUI's conventions for the IMAGE and MASK values a node returns."""
    if kind not in ("IMAGE", "MASK"):
        return
    dims = 4 if kind == "IMAGE" else 3
    if not isinstance(value, torch.Tensor) or value.ndim != dims or not value.is_floating_point():
        raise TypeError(f"{where}: a {kind} must be a float tensor with {dims} dims, got {value!r:.80}")
    if kind == "IMAGE" and value.shape[-1] != 3:
        raise TypeError(f"{where}: an IMAGE is (B, H, W, 3), got {tuple(value.shape)}")
    if value.numel() and (value.min() < 0 or value.max() > 1):
        raise ValueError(f"{where}: {kind} values must lie in [0, 1]")


@dataclass
class Executor:
    """Runs validated prompts; keeps node instances and outputs between prompts like ComfyUI's caches."""

    mappings: dict
    interrupt: Any = None  # called before each node function (ComfyUI: nodes.before_node_execution)
    outputs: dict = field(default_factory=dict)  # signature -> outputs
    objects: dict = field(default_factory=dict)  # (node id, class) -> instance
    calls: list = field(default_factory=list)  # (node id, class_type) of each node actually run

    def signature(self, prompt: dict, node: str) -> tuple:
        entry = prompt[node]
        parts = []
        for name, value in sorted(entry["inputs"].items()):
            link = isinstance(value, list)
            parts.append((name, (self.signature(prompt, value[0]), value[1]) if link else repr(value)))
        cls = self.mappings[entry["class_type"]]
        hidden = cls.INPUT_TYPES().get("hidden", {})
        return (entry["class_type"], tuple(parts), node if "UNIQUE_ID" in hidden.values() else None)

    def run(self, prompt: dict, extra_data: dict | None = None) -> dict:
        """Validate and execute; returns {node id: {"outputs": [...], "ui": {...}}} of the nodes run or
        reused (each output a list over the node's calls, as ComfyUI caches them)."""
        prompt = json.loads(json.dumps(prompt))  # validation converts constants in place
        results: dict = {}
        with torch.inference_mode():
            for node in validate_prompt(prompt, self.mappings):
                self._execute(prompt, node, results, extra_data or {})
        return results

    def _execute(self, prompt: dict, node: str, results: dict, extra_data: dict) -> None:
        if node in results:
            return
        entry = prompt[node]
        cls = self.mappings[entry["class_type"]]
        data = {}
        for name, value in entry["inputs"].items():
            if input_info(cls, name)[1] is None:
                continue  # ComfyUI ignores inputs the node does not declare
            if isinstance(value, list):
                self._execute(prompt, value[0], results, extra_data)
                data[name] = results[value[0]]["outputs"][value[1]]
            else:
                data[name] = [value]
        hidden = {"PROMPT": prompt, "UNIQUE_ID": node, "EXTRA_PNGINFO": extra_data.get("extra_pnginfo")}
        for name, kind in cls.INPUT_TYPES().get("hidden", {}).items():
            if kind in hidden:
                data[name] = [hidden[kind]]
        key = self.signature(prompt, node)
        if key not in self.outputs or getattr(cls, "OUTPUT_NODE", False):  # output nodes run every time
            self.outputs[key] = self._call(node, entry["class_type"], cls, data)
        results[node] = self.outputs[key]

    def _call(self, node: str, class_type: str, cls: type, data: dict) -> dict:
        instance = self.objects.setdefault((node, class_type), cls())
        function = getattr(instance, cls.FUNCTION)
        if getattr(cls, "INPUT_IS_LIST", False):
            batches = [data]
        else:
            count = max((len(v) for v in data.values()), default=1)
            batches = [{k: v[min(i, len(v) - 1)] for k, v in data.items()} for i in range(count)]
        returned, ui = [], {}
        for arguments in batches:
            try:
                if self.interrupt is not None:
                    self.interrupt()
                value = function(**arguments)
            except Exception as error:
                raise NodeError(node, class_type, error) from error
            self.calls.append((node, class_type))
            if isinstance(value, dict):
                for k, v in value.get("ui", {}).items():
                    ui.setdefault(k, []).extend(v)
                value = value.get("result", ())
            if not isinstance(value, tuple) or len(value) != len(cls.RETURN_TYPES):
                raise NodeError(
                    node, class_type, TypeError(f"want a {len(cls.RETURN_TYPES)}-tuple, got {value!r:.80}")
                )
            for kind, item in zip(cls.RETURN_TYPES, value):
                try:
                    check_value(kind, item, f"output {kind}")
                except (TypeError, ValueError) as error:
                    raise NodeError(node, class_type, error) from error
            returned.append(value)
        outputs = [[r[i] for r in returned] for i in range(len(cls.RETURN_TYPES))]
        for i, is_list in enumerate(getattr(cls, "OUTPUT_IS_LIST", ())):
            if is_list:
                outputs[i] = [x for r in returned for x in r[i]]
        return {"outputs": outputs, "ui": ui}


# ---------------------------------------------------------------------------------------------- core nodes
def core_nodes(input_dir: Path, output_dir: Path) -> dict:
    """Stand-ins for ComfyUI's LoadImage and SaveImage (same inputs, outputs and conversions)."""

    class LoadImage:
        @classmethod
        def INPUT_TYPES(cls) -> dict:
            files = sorted(f.name for f in Path(input_dir).iterdir() if f.is_file())
            return {"required": {"image": (files, {"image_upload": True})}}

        CATEGORY = "image"
        RETURN_TYPES = ("IMAGE", "MASK")
        FUNCTION = "load_image"

        def load_image(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
            picture = ImageOps.exif_transpose(Image.open(Path(input_dir) / image))
            pixels = torch.from_numpy(np.array(picture.convert("RGB")).astype(np.float32) / 255.0)[None]
            if "A" in picture.getbands():
                mask = 1.0 - torch.from_numpy(np.array(picture.getchannel("A")).astype(np.float32) / 255.0)
            else:
                mask = torch.zeros((64, 64), dtype=torch.float32)
            return (pixels, mask.unsqueeze(0))

    class SaveImage:
        @classmethod
        def INPUT_TYPES(cls) -> dict:
            return {
                "required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
            }

        RETURN_TYPES = ()
        FUNCTION = "save_images"
        OUTPUT_NODE = True
        CATEGORY = "image"

        def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None) -> dict:
            results = []
            for image in images:
                array = np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)
                name = f"{filename_prefix}_{len(list(Path(output_dir).glob('*.png'))):05}_.png"
                Image.fromarray(array).save(Path(output_dir) / name)
                results.append({"filename": name, "subfolder": "", "type": "output"})
            return {"ui": {"images": results}}

    return {"LoadImage": LoadImage, "SaveImage": SaveImage}


# ---------------------------------------------------------------------------------------------- fake comfy
class InterruptProcessingException(Exception):
    """As ``comfy.model_management.InterruptProcessingException``."""


@dataclass
class FakeComfy:
    """Fake ``comfy.model_management`` and ``comfy.utils``: record what nodes ask of ComfyUI; with
    ``cancel_after`` = n, the n-th interrupt check raises (the user pressed Cancel)."""

    device: str = "cpu"
    cancel_after: int | None = None
    checks: int = 0
    progress: list = field(default_factory=list)  # (value, total) of each update
    freed: list = field(default_factory=list)

    def install(self, monkeypatch: Any) -> FakeComfy:
        fake = self
        comfy = types.ModuleType("comfy")
        management = types.ModuleType("comfy.model_management")
        utils = types.ModuleType("comfy.utils")
        management.InterruptProcessingException = InterruptProcessingException
        management.get_torch_device = lambda: torch.device(fake.device)
        management.free_memory = self.free_memory
        management.throw_exception_if_processing_interrupted = self.check

        class ProgressBar:
            def __init__(self, total: int, node_id: str | None = None) -> None:
                self.total = total

            def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
                fake.progress.append((value, total if total is not None else self.total))

        utils.ProgressBar = ProgressBar
        comfy.model_management, comfy.utils = management, utils
        for name, module in (
            ("comfy", comfy),
            ("comfy.model_management", management),
            ("comfy.utils", utils),
        ):
            monkeypatch.setitem(sys.modules, name, module)
        return self

    def free_memory(self, num_bytes: int, device: torch.device, keep_loaded: tuple = ()) -> None:
        self.freed.append((num_bytes, device))

    def check(self) -> None:
        self.checks += 1
        if self.cancel_after is not None and self.checks >= self.cancel_after:
            raise InterruptProcessingException()
