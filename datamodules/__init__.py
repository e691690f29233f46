"""Data modules: one file per task family, built on ``SyntheticTask``; ``PileDataModule`` streams prepared text."""

from looped.datamodules.addition import NaryAddition
from looped.datamodules.arc import Arc

# Chain-of-thought DP tasks (Feng et al. 2023), direct and cot formats
from looped.datamodules.arithmetic import ModularArithmetic
from looped.datamodules.base import SyntheticTask
from looped.datamodules.cot import CoTTask
from looped.datamodules.edit_distance import EditDistance
from looped.datamodules.groups import GroupComposition
from looped.datamodules.igsm import IGSM
from looped.datamodules.lis import LongestIncreasingSubsequence
from looped.datamodules.maze import Maze
from looped.datamodules.phop import PHop
from looped.datamodules.pile import PileDataModule
from looped.datamodules.primitives import ReasoningPrimitives
from looped.datamodules.published import PublishedPuzzles
from looped.datamodules.sudoku import Sudoku

__all__ = [
    "SyntheticTask",
    "GroupComposition",
    "IGSM",
    "NaryAddition",
    "PHop",
    "PileDataModule",
    "ReasoningPrimitives",
    "CoTTask",
    "ModularArithmetic",
    "LongestIncreasingSubsequence",
    "EditDistance",
    # Puzzles of the recursive reasoners (TRM, HRM)
    "Sudoku",
    "Maze",
    "Arc",
    "PublishedPuzzles",
]
