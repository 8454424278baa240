"""OmniGen custom nodes for ComfyUI, built on the ``omnigen`` package's pipeline.

Install: put this folder (or a symbolic link to it) into ``ComfyUI/custom_nodes`` under a name other than
``omnigen`` (ComfyUI registers the folder under its own name, which must not hide the library), and
install ``omnigen`` into ComfyUI's Python environment. Nodes: "OmniGen Loader" (-> OMNIGEN_PIPE) and
"OmniGen Generate" (-> IMAGE); an example workflow in ComfyUI's API format is in ``workflows/``.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
