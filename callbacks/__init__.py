"""Callbacks that read the looped forward pass (Lightning's own monitors are used as they are)."""

from looped.callbacks.per_loop import PerLoopAccuracy

__all__ = ["PerLoopAccuracy"]
