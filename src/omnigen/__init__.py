"""omnigen: a clean, fast, offline-first re-implementation of OmniGen (unified image generation).

Public API only; importing this package loads no weights and has no side effects.
"""

from omnigen.config import OmniGenConfig, RopeScaling, TransformerConfig
from omnigen.generation import GenerationConfig
from omnigen.pipeline import OmniGenPipeline

__version__ = "0.1.0"

__all__ = [
    "GenerationConfig",
    "OmniGenConfig",
    "OmniGenPipeline",
    "RopeScaling",
    "TransformerConfig",
    "__version__",
]
