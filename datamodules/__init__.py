"""Data modules: one file per task family, all built on ``SyntheticTask``."""

from looped.datamodules.base import SyntheticTask
from looped.datamodules.addition import NaryAddition
from looped.datamodules.groups import GroupComposition
from looped.datamodules.phop import PHop
from looped.datamodules.primitives import ReasoningPrimitives

__all__ = ["SyntheticTask", "GroupComposition", "PHop", "ReasoningPrimitives", "NaryAddition"]
