"""Data modules: one file per task family, all built on ``SyntheticTask``."""

from looped.datamodules.base import SyntheticTask
from looped.datamodules.phop import PHop

__all__ = ["SyntheticTask", "PHop"]
