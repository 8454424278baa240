"""OmniGen custom nodes for ComfyUI, built on the ``omnigen`` package's pipeline.

Install: ``git clone`` the repository into ``ComfyUI/custom_nodes`` (or ComfyUI-Manager's "install via
git URL"): the repository's root ``__init__.py`` loads this package. Nodes: "OmniGen Loader"
(-> OMNIGEN_PIPE), "OmniGen LoRA" (OMNIGEN_PIPE -> OMNIGEN_PIPE) and "OmniGen Generate" (-> IMAGE), their settings derived from GenerationConfig
(``fields``); an example workflow in ComfyUI's API format is in ``workflows/``.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
