"""Module paths from before ``looped/`` had folders, kept working: recipes, saved ``config.yaml`` files and user code
name them (``looped.module.batch_size``, ``looped.optim.Adafactor``, ``looped.halting.ExitObjective``).

``install`` (run by ``import looped``) adds an import hook that answers an old path with the module that now
lives at the new one — the same module object under both names, loaded only when the old name is imported — so
``importlib.import_module("looped.optim").Adafactor is looped.training.optim.Adafactor``. New code imports the
new paths; this table is the one place the old ones are listed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

MOVED = {
    "looped.module": "looped.training.module",
    "looped.loop_schedule": "looped.training.loop_schedule",
    "looped.regularizer": "looped.training.regularizer",
    "looped.halting": "looped.training.halting",
    "looped.optim": "looped.training.optim",
    "looped.parallel": "looped.training.parallel",
    "looped.checkpoint": "looped.training.checkpoint",
    "looped.generation": "looped.evaluation.generation",
    "looped.loop_readout": "looped.evaluation.loop_readout",
    "looped.adaptive": "looped.evaluation.exits",
    "looped.adaptive_decode": "looped.decoding.per_token",
    "looped.depthwise": "looped.decoding.depthwise",
    "looped.cache": "looped.model.cache",
    "looped.mixers": "looped.model.mixers",
    "looped.mixers.base": "looped.model.mixers.base",
    "looped.mixers.softmax": "looped.model.mixers.softmax",
    "looped.mixers.linear": "looped.model.mixers.linear",
    "looped.mixers.sparse": "looped.model.mixers.sparse",
    "looped.cli_errors": "looped.cli.errors",
}
"""Old import path -> where that module lives now."""


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path in ``MOVED`` and loads it as the module at its new path."""

    def __init__(self) -> None:
        self.specs: dict[str, importlib.machinery.ModuleSpec] = {}  # each moved module's own spec, by its name

    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        self.specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system has just stamped the old name's spec on the module: give it back its own, so
        # that pickling, reloading and tracebacks see the module where it lives.
        module.__spec__ = self.specs[module.__name__]


def install() -> None:
    """Add the hook once (``import looped`` calls it), first: an old subpackage path (``looped.mixers.base``)
    must not be found as a second copy of the file by the path finder."""
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModules())
