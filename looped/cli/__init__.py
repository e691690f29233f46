"""The command line: ``looped {fit,validate,test,predict,run,report,prepare,...}`` and ``lightning run RECIPE``.

* ``app`` — ``LoopedCLI`` (LightningCLI) and the two console scripts, ``main`` and ``lightning_main``;
* ``errors`` — how they end on a user's mistake: one last line, ``looped: error: ...``, exit status 2;
* ``help`` — the help texts (``looped --help``, ``looped run --help``).

``python -m looped.cli ...`` is the ``looped`` command (``torchrun -m looped.cli run RECIPE``).
"""

from looped.cli.app import TOOLS, LoopedCLI, console_cli, evaluate, lightning_main, main, resolve_recipe, run

__all__ = ["TOOLS", "LoopedCLI", "console_cli", "evaluate", "lightning_main", "main", "resolve_recipe", "run"]
