"""Callbacks that read the looped forward pass (Lightning's own monitors are used as they are)."""

from looped.callbacks.adaptive_exit import AdaptiveExit
from looped.callbacks.arc_score import ArcScore
from looped.callbacks.block_cosine import BlockCosineSimilarity
from looped.callbacks.checkpoint import Checkpoint
from looped.callbacks.faults import SimulatedFaults
from looped.callbacks.interrupt import InterruptCheckpoint
from looped.callbacks.isoplot import IsoplotRecorder
from looped.callbacks.loop_dynamics import LoopDynamics
from looped.callbacks.per_loop import PerLoopAccuracy
from looped.callbacks.stacking import GradualStacking

__all__ = [
    "AdaptiveExit",
    "ArcScore",
    "BlockCosineSimilarity",
    "Checkpoint",
    "GradualStacking",
    "InterruptCheckpoint",
    "IsoplotRecorder",
    "LoopDynamics",
    "PerLoopAccuracy",
    "SimulatedFaults",
]
