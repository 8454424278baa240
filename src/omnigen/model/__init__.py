"""The OmniGen network: decoder stack, image/time embeddings, condition cache."""

from omnigen.model.cache import ConditionCache
from omnigen.model.omnigen import OmniGenModel

__all__ = ["ConditionCache", "OmniGenModel"]
