"""Looped transformers: a block of k layers applied L times with shared weights, ``(k⊗L)``."""

from looped.model import LoopedConfig, LoopedTransformer
from looped.module import LoopedLM

__all__ = ["LoopedConfig", "LoopedTransformer", "LoopedLM"]
__version__ = "0.1.0"
