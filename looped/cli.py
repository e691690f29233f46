"""Command line: ``looped {fit,validate,test,predict,run,report,prepare,sweep,lm-eval}``, ``lightning run RECIPE``.

``looped run RECIPE.yaml [--key value ...]`` trains the recipe, then tests the
best checkpoint. ``looped report RUNS... --output DIR`` turns TensorBoard logs
into the paper's tables and figures. Every other subcommand is LightningCLI's own, so
``--print_config``, ``--config`` and dotted overrides work as documented by Lightning.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from importlib import metadata
from unittest import mock

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy

from looped.contract import DataModuleContract, check_data_module
from looped.module import LoopedLM, transformer_on_meta

# ``looped TOOL ...`` subcommands beside LightningCLI's own: the module whose ``main(argv)`` runs each.
TOOLS = {
    "report": "looped.tools.report",  # tables and figures from finished runs
    "prepare": "looped.tools.prepare",  # Pile shards -> litdata token chunks; BPE tokenizer training
    "sweep": "looped.tools.sweep",  # a grid of recipe variants, one run directory per cell
    "lm-eval": "looped.tools.lm_eval_adapter",  # lm-evaluation-harness with the `looped` model (the [eval] extra)
    "plan": "looped.tools.plan",  # memory per rank, fits or not, and days, before a cluster is booked
}
USAGE_RUN = "usage: looped run RECIPE.yaml [--section.key value ...]   (e.g. --trainer.max_steps 200)"


class LoopedCLI(LightningCLI):
    """LightningCLI whose recipes name any ``LoopedLM`` subclass and any ``LightningDataModule``.

    The data module is the single source of ``vocab_size`` and sequence length:
    both are linked into ``model.config`` after the data module is built; its
    ``eos_id`` into ``model.eos_id`` (``looped.contract.DataModuleContract``).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", LoopedLM)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", L.LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)  # the optimiser is a LoopedLM argument
        super().__init__(*args, **kwargs)

    def instantiate_classes(self) -> None:
        """Under ``ModelParallelStrategy``, build the transformer on the meta device (``transformer_on_meta``).

        ``LoopedLM.configure_model`` then shards it and each rank materialises its own shards,
        so a 1B recipe never holds the whole fp32 model (~4 GB) in every rank's CPU memory.
        """
        with transformer_on_meta(self._shards_in_configure_model()):
            super().instantiate_classes()

    def _shards_in_configure_model(self) -> bool:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        strategy = config.get("trainer", {}).get("strategy")
        if isinstance(strategy, ModelParallelStrategy):
            return True
        path = strategy.get("class_path") if hasattr(strategy, "get") else None
        if not isinstance(path, str):
            return False  # a strategy named by string ("ddp", "fsdp", ...) builds the model whole
        module, _, name = path.rpartition(".")
        return issubclass(getattr(importlib.import_module(module), name), ModelParallelStrategy)

    def add_arguments_to_parser(self, parser) -> None:
        # First, so that a data module missing part of the contract is named before another link trips on it.
        parser.link_arguments("data", "model.init_args.eos_id", compute_fn=data_eos_id, apply_on="instantiate")
        parser.link_arguments("data.vocab_size", "model.init_args.config.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.seq_len", "model.init_args.config.max_seq_len", apply_on="instantiate")


def data_eos_id(data: DataModuleContract) -> int | None:
    """The data module's ``eos_id`` (None unless its task is scored by generation), after checking its contract."""
    check_data_module(data)
    return data.eos_id


def resolve_recipe(recipe: str, *overrides: str) -> str:
    """The run a recipe stands for, as YAML: its ``config:`` bases applied, then ``overrides``, every default filled in.

    Exactly what ``looped fit --config RECIPE [--key value ...] --print_config`` prints. Read recipes
    through this, never with a plain YAML load: a row holds only what differs from its base.
    """
    out, err = io.StringIO(), io.StringIO()
    try:
        with (
            mock.patch.object(sys, "argv", sys.argv[:1]),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            LoopedCLI(args=["fit", "--config", str(recipe), *overrides, "--print_config"])
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise ValueError(f"{recipe} does not resolve:\n{err.getvalue()[-3000:]}") from None
    return out.getvalue()


def run(argv: list[str]) -> LoopedCLI:
    """Fit a recipe, then test its best checkpoint (the weights it ended with if none was saved)."""
    if not argv or argv[0].startswith("-"):
        raise SystemExit(USAGE_RUN)
    recipe, overrides = argv[0], argv[1:]
    cli = LoopedCLI(args=["fit", "--config", recipe, *overrides])
    checkpoint = cli.trainer.checkpoint_callback
    best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or None)
    return cli


def main(argv: list[str] | None = None) -> None:
    """Console script ``looped``."""
    argv = _take_argv(argv)
    if argv and argv[0] == "run":
        run(argv[1:])
        return
    if argv and argv[0] in TOOLS:
        # Imported on demand: matplotlib, tokenizers, zstandard only load for the tool that needs them.
        try:
            tool = importlib.import_module(TOOLS[argv[0]])
        except ModuleNotFoundError as err:
            extra = " (pip install -e '.[eval]')" if argv[0] == "lm-eval" else ""
            raise SystemExit(f"looped {argv[0]}: needs the package {err.name!r}{extra}") from err
        tool.main(argv[1:])
        return
    LoopedCLI(args=argv)


def _take_argv(argv: list[str] | None) -> list[str]:
    """The arguments to parse; consumed from ``sys.argv`` so LightningCLI does not read them twice."""
    if argv is None:
        argv, sys.argv[1:] = sys.argv[1:], []
    return list(argv)


def lightning_main(argv: list[str] | None = None) -> None:
    """Console script ``lightning``: ``lightning run RECIPE.yaml`` is ``looped run RECIPE.yaml``.

    Lightning 2.6 installs no ``lightning`` command. The separate ``lightning-sdk``
    package installs a cloud CLI of that name; when it is importable, every other
    subcommand is handed to it.
    """
    argv = _take_argv(argv)
    if len(argv) >= 2 and argv[0] == "run" and argv[1].endswith((".yaml", ".yml")):
        run(argv[1:])
        return
    sdk = _lightning_sdk_entry_point()
    if sdk is None:
        raise SystemExit(
            "lightning: this command runs recipes: `lightning run recipes/NAME.yaml [--key value ...]`.\n"
            "Other `lightning` subcommands belong to Lightning AI's cloud CLI: `pip install lightning-sdk`."
        )
    sys.argv = ["lightning", *argv]
    sys.exit(sdk())


def _lightning_sdk_entry_point():
    for entry in metadata.entry_points(group="console_scripts", name="lightning"):
        if entry.dist is not None and entry.dist.name.replace("_", "-").lower() == "lightning-sdk":
            return entry.load()
    return None


if __name__ == "__main__":
    main()
