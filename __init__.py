"""ComfyUI's entry point when this whole repository is a custom-node folder.

``git clone <this repository>`` into ``ComfyUI/custom_nodes`` (or ComfyUI-Manager's "install via git
URL", which also runs ``pip install -r requirements.txt``) makes ``custom_nodes/<folder>/`` this
repository; ComfyUI then executes this file as a module named after the folder and reads
``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS`` from it. The nodes themselves are ``comfyui/``.

The file does nothing outside ComfyUI (recognised by its ``folder_paths`` module, which ComfyUI
imports before any custom node): pytest imports a root ``__init__.py`` when it collects ``tests/``, and
the ``omnigen`` library never imports it (setuptools packages ``src/`` only). Inside ComfyUI two things
stand in the way, and are handled here:

- the folder is usually called ``omnigen``, the library's name, so ComfyUI's ``sys.modules["omnigen"]``
  is this file: the entry is dropped again before the library is imported (ComfyUI keeps its own
  reference to this module);
- the library may not be installed into ComfyUI's Python: then it is imported from ``src/`` here.

``comfyui/`` is loaded as the package ``omnigen_comfyui``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_ROOT = Path(__file__).resolve().parent
_NODES_PACKAGE = "omnigen_comfyui"


def _import_library() -> None:
    """``import omnigen`` (the library), from ``src/`` when it is not installed."""
    this = sys.modules.get(__name__)
    if this is not None and sys.modules.get("omnigen") is this:  # the folder is named omnigen
        del sys.modules["omnigen"]
    spec = importlib.util.find_spec("omnigen")
    if spec is None or spec.origin is None or Path(spec.origin).resolve() == Path(__file__).resolve():
        sys.path.insert(0, str(_ROOT / "src"))
    importlib.import_module("omnigen")


def _load_nodes() -> ModuleType:
    if _NODES_PACKAGE in sys.modules:
        return sys.modules[_NODES_PACKAGE]
    _import_library()
    spec = importlib.util.spec_from_file_location(_NODES_PACKAGE, _ROOT / "comfyui" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NODES_PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_NODES_PACKAGE]
        raise
    return module


if "folder_paths" in sys.modules:  # inside ComfyUI
    _nodes = _load_nodes()
    NODE_CLASS_MAPPINGS = _nodes.NODE_CLASS_MAPPINGS
    NODE_DISPLAY_NAME_MAPPINGS = _nodes.NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
