"""Data modules: one file per task family, built on ``SyntheticTask``; ``PileDataModule`` streams prepared text."""

from looped.datamodules.addition import NaryAddition
from looped.datamodules.base import SyntheticTask
from looped.datamodules.groups import GroupComposition
from looped.datamodules.igsm import IGSM
from looped.datamodules.phop import PHop
from looped.datamodules.pile import PileDataModule
from looped.datamodules.primitives import ReasoningPrimitives

__all__ = [
    "SyntheticTask", "GroupComposition", "IGSM", "NaryAddition", "PHop", "PileDataModule", "ReasoningPrimitives",
]
