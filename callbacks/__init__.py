"""Callbacks that read the looped forward pass (Lightning's own monitors are used as they are)."""

from looped.callbacks.interrupt import InterruptCheckpoint
from looped.callbacks.per_loop import PerLoopAccuracy

__all__ = ["InterruptCheckpoint", "PerLoopAccuracy"]
