"""Command line: ``looped {fit,validate,test,predict,run,report,prepare,sweep,lm-eval}``, ``lightning run RECIPE``.

``looped run RECIPE.yaml [--key value ...]`` trains the recipe, then tests the
best checkpoint. ``looped report RUNS... --output DIR`` turns TensorBoard logs
into the paper's tables and figures. Every other subcommand is LightningCLI's own, so
``--print_config``, ``--config`` and dotted overrides work as documented by Lightning.

A user's mistake ends the process with one last line, ``looped: error: <message>``, and exit
status 2 (``looped.cli.errors``); ``--debug`` or ``LOOPED_DEBUG=1`` adds the traceback.
``validate`` and ``test`` print one table of results, a row per evaluation set
(``looped.tools.eval_table``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
import yaml
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info

from looped.cli.errors import one_line_errors, take_debug_flag, user_message
from looped.cli.help import lightning_help, looped_help, run_help
from looped.cli.user_code import user_class_error, user_code_importable
from looped.contract import DataModuleContract, check_data_module
from looped.errors import InputError, exception_chain
from looped.tools.eval_table import print_eval_table
from looped.training.checkpoint import AUTO, check_same_data, check_same_model, is_local_path, read_checkpoint
from looped.training.module import LoopedLM, transformer_on_meta
from looped.training.parallel import join_after_restart
from looped.training.saving import find_resume

# ``looped TOOL ...`` subcommands beside LightningCLI's own: the module whose ``main(argv)`` runs each.
TOOLS = {
    "report": "looped.tools.report",  # tables and figures from finished runs
    "prepare": "looped.tools.prepare",  # Pile shards or text files -> litdata token chunks; BPE training
    "sweep": "looped.tools.sweep",  # a grid of recipe variants, one run directory per cell
    "lm-eval": "looped.tools.lm_eval_adapter",  # lm-evaluation-harness with the `looped` model (the [eval] extra)
    "export": "looped.tools.export",  # a trained run as a transformers model folder (the [hf] extra)
    "plan": "looped.tools.plan",  # memory per rank, fits or not, and days, before a cluster is booked
    "new": "looped.tools.new",  # the skeleton of a task in your own package: task, recipe, test
    "retrofit": "looped.tools.retrofit",  # a pretrained plain model looped: Llama/Qwen or ours -> a (k⊗L) checkpoint
}
HELP = ("-h", "--help")


class LoopedCLI(LightningCLI):
    """LightningCLI whose recipes name any ``LoopedLM`` subclass and any ``LightningDataModule``.

    The data module is the single source of ``vocab_size`` and sequence length:
    both are linked into ``model.config`` after the data module is built; its
    ``eos_id`` into ``model.eos_id`` (``looped.contract.DataModuleContract``), and
    its ``num_puzzle_ids`` (ARC's) into ``model.config.puzzle_ids``.

    Before a subcommand runs, ``--ckpt_path`` is checked against the recipe and its data
    (``looped.training.checkpoint``) and ``trainer.devices`` against the machine.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", LoopedLM)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", L.LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)  # the optimiser is a LoopedLM argument
        self.checkpoint: dict[str, Any] | None = None  # the non-tensor state of --ckpt_path, once read
        given = kwargs.get("args")  # a list, a dict, or None: sys.argv
        argv = list(given) if isinstance(given, (list, tuple)) else sys.argv[1:] if given is None else []
        with user_code_importable(["fit", *argv]):  # a user's package, found as `python -m` finds it
            super().__init__(*args, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        """Read ``--ckpt_path`` right after parsing, before LightningCLI loads its hyper-parameters into the recipe."""
        with warnings.catch_warnings():
            # The console scripts pass sys.argv's arguments as ``args`` and leave sys.argv for Lightning's launcher.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        if config is None:
            return
        model_config = config.get("model", {}).get("init_args", {}).get("config")
        if model_config is not None:
            model_config = model_config.as_dict() if hasattr(model_config, "as_dict") else dict(model_config)
        if config.get("ckpt_path") == AUTO:
            self._resume_automatically(config, model_config)
        if not is_local_path(config.get("ckpt_path")):
            return
        self.checkpoint = read_checkpoint(config["ckpt_path"])
        if model_config is not None:
            check_same_model(self.checkpoint, model_config, config["ckpt_path"])

    def _parse_ckpt_path(self) -> None:
        """Keep the recipe as typed: the checkpoint's hyper-parameters do not replace it.

        LightningCLI 2.6 parses a checkpoint's hyper-parameters over the recipe when ``--ckpt_path`` is given.
        That overrides what the user typed on the command line (a resumed run with a longer schedule runs the old
        one), and hyper-parameters saved without a class path are parsed as the default ``LoopedLM``, so the resume
        of a subclass with its own arguments (``DeepSupervision``'s ``supervision_steps``, a user's module) fails.
        The recipe is the source of truth here; ``parse_arguments`` refuses a checkpoint of another model.
        """

    def _resume_automatically(self, config, model_config: dict[str, Any] | None) -> None:
        """``--ckpt_path auto``: the run's newest complete checkpoint, in the run's own ``version_N`` and log.

        A restarted job (``torchrun --max-restarts``, SLURM's requeue) re-runs the same command; this makes that
        command continue the run it restarts instead of starting a new ``version_N+1`` from step 0.
        """
        trainer = config.get("trainer") or {}
        run_dir, logger_args, folders = run_location(trainer)
        found = find_resume(run_dir, model_config, folders)
        for line in found.skipped:
            rank_zero_info(f"--ckpt_path auto: passed over {line}")
        if found.path is None:
            config["ckpt_path"] = None
            rank_zero_info(f"--ckpt_path auto: no complete checkpoint of {run_dir} yet; starting a fresh run")
            return
        config["ckpt_path"] = str(found.path)
        if found.version is not None and logger_args is not None:
            logger_args["version"] = found.version  # the same version_N folder: its log continues
        self.save_config_kwargs["overwrite"] = True  # that run's config.yaml, rewritten by the same command
        rank_zero_info(f"--ckpt_path auto: resuming {found.path} (step {found.step})")

    def instantiate_classes(self) -> None:
        """Under ``ModelParallelStrategy``, build the transformer on the meta device (``transformer_on_meta``).

        ``LoopedLM.configure_model`` then shards it and each rank materialises its own shards,
        so a 1B recipe never holds the whole fp32 model (~4 GB) in every rank's CPU memory.
        """
        try:
            with transformer_on_meta(self._shards_in_configure_model()):
                super().instantiate_classes()
        except (ValueError, TypeError) as error:
            message = user_class_error(list(exception_chain(error)), self._named_classes())
            if message is None:
                raise  # a bug here, or the user's mistake already worded (an InputError)
            raise InputError(message) from error

    def _named_classes(self) -> dict[type, str]:
        """The classes the recipe names, each with its key: ``model``, ``data``, ``trainer.callbacks``..."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer = config.get("trainer", {}) or {}
        named = [(key, config.get(key)) for key in ("model", "data")] + [("trainer.logger", trainer.get("logger"))]
        named += [("trainer.callbacks", callback) for callback in trainer.get("callbacks") or []]
        found = {}
        for key, value in named:
            path = value.get("class_path") if hasattr(value, "get") else None
            module, _, name = path.rpartition(".") if isinstance(path, str) else ("", "", "")
            with contextlib.suppress(ImportError, AttributeError, ValueError):
                found.setdefault(getattr(importlib.import_module(module), name), key)
        return found

    def after_instantiate_classes(self) -> None:
        if self.checkpoint is not None and isinstance(self.model, LoopedLM):
            check_same_data(self.checkpoint, self.datamodule, self.model.config)

    def before_fit(self) -> None:
        join_after_restart(self.trainer.strategy)  # torchrun --max-restarts: the restarted job's own group

    def instantiate_trainer(self, **kwargs):
        if self.subcommand is not None:  # a run, not a recipe built to be inspected (run=False)
            check_devices(self._get(self.config_init, "trainer", default={}))
        return super().instantiate_trainer(**kwargs)

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
        # Only data with puzzle ids (ARC) has num_puzzle_ids; the rest link None (no puzzle embedding to size).
        parser.link_arguments(
            "data", "model.init_args.config.puzzle_ids", compute_fn=data_puzzle_ids, apply_on="instantiate"
        )

    # `looped validate` / `looped test`: LightningCLI calls these instead of the trainer's own.
    def validate(self, **kwargs) -> list[dict[str, float]]:
        return evaluate(self.trainer, "validate", **kwargs)

    def test(self, **kwargs) -> list[dict[str, float]]:
        return evaluate(self.trainer, "test", **kwargs)


def evaluate(trainer: L.Trainer, fn: str, verbose: bool = True, **kwargs) -> list[dict[str, float]]:
    """``trainer.validate``/``trainer.test``, printing one table by evaluation set instead of Lightning's."""
    results = getattr(trainer, fn)(verbose=False, **kwargs)
    if verbose and trainer.is_global_zero:
        model = kwargs.get("model") or trainer.lightning_module
        config = getattr(model, "config", None)
        ckpt = trainer.ckpt_path
        print_eval_table(
            results,
            stage="val" if fn == "validate" else "test",
            eval_names=getattr(model, "eval_names", []),
            trained_loops=getattr(config, "loops", None),
            title=f"{fn}: " + (f"checkpoint {ckpt}" if ckpt else "the weights in memory"),
            trained_steps=getattr(model, "supervision_steps", None),
        )
    return results


def run_location(trainer: dict[str, Any]) -> tuple[Path, Any, list[Path]]:
    """Where a recipe's run keeps its versions (``save_dir/name`` of its logger), the logger's arguments (to set its
    ``version``; None without a logger of that kind) and the checkpoint folders its callbacks name themselves."""
    root = Path(trainer.get("default_root_dir") or ".")
    logger = trainer.get("logger")
    logger_args = logger.get("init_args") if hasattr(logger, "get") else None
    if logger_args is not None:
        run_dir = Path(logger_args.get("save_dir") or root) / str(logger_args.get("name") or "")
        version = logger_args.get("version")
        if version is not None:  # a version the recipe fixes: only that one
            folder = f"version_{version}" if isinstance(version, int) else str(version)
            return run_dir, None, [run_dir / folder / "checkpoints"]
    else:  # Lightning's default logger (runs in default_root_dir/lightning_logs), or none (default_root_dir)
        run_dir = root / "lightning_logs" if logger is None or logger is True else root
    folders = []
    for callback in trainer.get("callbacks") or []:
        dirpath = callback.get("init_args", {}).get("dirpath") if hasattr(callback, "get") else None
        if dirpath:
            folders.append(Path(dirpath))
    if logger is False:
        folders.append(root / "checkpoints")
    return run_dir, logger_args, folders


def data_eos_id(data: DataModuleContract) -> int | None:
    """The data module's ``eos_id`` (None unless its task is scored by generation), after checking its contract."""
    check_data_module(data)
    return data.eos_id


def data_puzzle_ids(data: DataModuleContract) -> int | None:
    """The data module's ``num_puzzle_ids`` (the rows a puzzle embedding needs), None for data without puzzle ids."""
    return getattr(data, "num_puzzle_ids", None)


def check_devices(trainer: dict[str, Any]) -> None:
    """Refuse ``trainer.accelerator: gpu`` without a GPU, and ``trainer.devices`` above what the machine has."""
    devices, accelerator = trainer.get("devices", "auto"), trainer.get("accelerator", "auto")
    if not isinstance(accelerator, str):
        return  # an Accelerator instance: Lightning checks it
    gpu = CUDAAccelerator.is_available() or MPSAccelerator.is_available()
    if accelerator in ("gpu", "cuda") and not gpu:
        raise InputError(
            f"trainer.accelerator={accelerator}, but torch sees no GPU on this machine; "
            "use --trainer.accelerator cpu (or auto)"
        )
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        return  # "auto", -1 (all), a list of device indices: Lightning checks those
    if accelerator == "auto":
        accelerator = "cuda" if CUDAAccelerator.is_available() else "mps" if MPSAccelerator.is_available() else "cpu"
    if accelerator in ("gpu", "cuda") and CUDAAccelerator.is_available():
        available, what = CUDAAccelerator.auto_device_count(), "GPUs"
    elif accelerator == "cpu":
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        what = "CPU cores (one process per device)"
    else:
        return  # MPS (one device), TPU...: Lightning checks them
    if devices > available:
        raise InputError(
            f"trainer.devices={devices}, but this machine has {available} {what}; "
            f"use --trainer.devices {available} (or fewer), or run on a machine with more"
        )


def resolve_recipe(recipe: str, *overrides: str) -> str:
    """The run a recipe stands for, as YAML: its ``config:`` bases applied, then ``overrides``, every default filled in.

    Exactly what ``looped fit --config RECIPE [--key value ...] --print_config`` prints. Read recipes
    through this, never with a plain YAML load: a row holds only what differs from its base.
    """
    out = io.StringIO()
    args = ["fit", "--config", str(recipe), *overrides, "--print_config"]
    try:
        with (
            mock.patch.object(sys, "argv", sys.argv[:1]),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(io.StringIO()),
            _exits_zero(),
        ):
            console_cli(args)
    except Exception as error:  # the cause, worded as the command line words it, not a usage dump
        message = user_message(error, args)
        if message is None:
            raise
        raise ValueError(f"{recipe} does not resolve: {message}") from error
    return out.getvalue()


def console_cli(args: list[str]) -> LoopedCLI:
    """``LoopedCLI`` as the console scripts run it: parse errors raise (``looped.cli.errors`` prints one line)."""
    raising = {"exit_on_error": False}
    return LoopedCLI(args=args, parser_kwargs={**raising, **{name: raising for name in LightningCLI.subcommands()}})


def run(argv: list[str], prog: str = "looped run") -> LoopedCLI | None:
    """Fit a recipe, then test its best checkpoint (the weights it ended with if none was saved)."""
    if not argv or argv[0] in HELP:
        if argv:
            print(run_help(prog))
            return None
        print(run_help(prog), file=sys.stderr)
        raise InputError(f"{prog} needs a recipe: {prog} RECIPE.yaml (`{prog} --help` lists the recipe folders)")
    recipe, overrides = argv[0], argv[1:]
    if recipe.startswith("-"):
        raise InputError(f"{prog}: the recipe comes first: {prog} RECIPE.yaml {recipe} ...")
    if not Path(recipe).is_file():
        raise InputError(f"recipe {recipe} does not exist; `{prog} --help` lists the recipe folders")
    if any(arg in HELP for arg in overrides):
        recipe_help(recipe, [a for a in overrides if a not in HELP], prog)
        return None
    cli = console_cli(["fit", "--config", recipe, *overrides])
    checkpoint = cli.trainer.checkpoint_callback
    best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
    evaluate(cli.trainer, "test", model=cli.model, datamodule=cli.datamodule, ckpt_path=best or None)
    return cli


def main(argv: list[str] | None = None) -> None:
    """Console script ``looped``."""
    argv, debug = take_debug_flag(_take_argv(argv))
    with one_line_errors(debug, argv):
        _looped(argv)


def _looped(argv: list[str]) -> None:
    if not argv or argv[0] in HELP:
        print(looped_help(TOOLS), file=sys.stdout if argv else sys.stderr)
        if not argv:
            raise InputError("choose a subcommand (listed above)")
        return
    if argv[0] == "run":
        run(argv[1:])
        return
    if argv[0] in TOOLS:
        # Imported on demand: matplotlib, tokenizers, zstandard only load for the tool that needs them.
        try:
            tool = importlib.import_module(TOOLS[argv[0]])
        except ModuleNotFoundError as err:
            extra = {"lm-eval": " (pip install -e '.[eval]')", "export": " (pip install -e '.[hf]')"}.get(argv[0], "")
            raise InputError(f"looped {argv[0]}: needs the package {err.name!r}{extra}") from err
        tool.main(argv[1:])
        return
    console_cli(recipe_as_config(argv))


def recipe_as_config(argv: list[str]) -> list[str]:
    """``looped test RECIPE.yaml ...`` as ``looped test --config RECIPE.yaml ...``: every subcommand takes its
    recipe first, as ``looped run`` does (LightningCLI alone would refuse the path, or apply overrides such as
    ``--trainer.logger.init_args.name`` to a config that has no logger yet)."""
    if len(argv) > 1 and argv[0] in LightningCLI.subcommands() and argv[1].endswith((".yaml", ".yml")):
        return [argv[0], "--config", *argv[1:]]
    return argv


def _take_argv(argv: list[str] | None) -> list[str]:
    """The arguments to parse. ``sys.argv`` stays as typed: Lightning's launcher starts the other ranks of a
    one-machine multi-device run (``--trainer.devices 8``) by running it again."""
    return list(sys.argv[1:] if argv is None else argv)


def lightning_main(argv: list[str] | None = None) -> None:
    """Console script ``lightning``: ``lightning run RECIPE.yaml`` is ``looped run RECIPE.yaml``.

    Lightning 2.6 installs no ``lightning`` command. The separate ``lightning-sdk``
    package installs a cloud CLI of that name; when it is importable, every other
    subcommand is handed to it.
    """
    argv, debug = take_debug_flag(_take_argv(argv))
    sdk = _lightning_sdk_entry_point()
    ours = not argv or argv[0] in HELP or (argv[0] == "run" and (len(argv) == 1 or not sdk or _is_recipe(argv[1])))
    if ours:
        with one_line_errors(debug, argv):
            if argv and argv[0] == "run":
                run(argv[1:], prog="lightning run")
                return
            print(lightning_help(sdk is not None), file=sys.stdout if argv else sys.stderr)
            if not argv:
                raise InputError("lightning run RECIPE.yaml runs a recipe (usage above)")
        return
    if sdk is None:
        with one_line_errors(debug, argv):
            raise InputError(
                "this command runs recipes: `lightning run recipes/NAME.yaml [--key value ...]`. Other `lightning` "
                "subcommands belong to Lightning AI's cloud CLI: `pip install lightning-sdk`"
            )
    sys.argv = ["lightning", *argv]
    sys.exit(sdk())


def _is_recipe(arg: str) -> bool:
    return arg in HELP or arg.endswith((".yaml", ".yml"))


def _lightning_sdk_entry_point():
    for entry in metadata.entry_points(group="console_scripts", name="lightning"):
        if entry.dist is not None and entry.dist.name.replace("_", "-").lower() == "lightning-sdk":
            return entry.load()
    return None


def recipe_help(recipe: str, overrides: list[str], prog: str = "looped run") -> None:
    """Every option of a recipe: LightningCLI's ``fit --help``, then the options of its model and data classes.

    In subclass mode ``fit --help`` names ``--model`` and ``--data`` but not their arguments;
    jsonargparse's ``--model.help CLASS`` lists those, for the classes the recipe names.
    """
    args = ["fit", "--config", recipe, *overrides]
    resolved = io.StringIO()
    with contextlib.redirect_stdout(resolved), _exits_zero():
        console_cli([*args, "--print_config"])
    config = yaml.safe_load(resolved.getvalue()) or {}
    with _exits_zero():
        console_cli([*args, "--help"])
    for key in ("model", "data"):
        class_path = (config.get(key) or {}).get("class_path")
        if class_path:
            print(f"\n{key}: {class_path}, as {recipe} names it")
            with _exits_zero():
                console_cli([*args, f"--{key}.help", class_path])
    print(
        f"\nThe value of every key as {recipe} sets it: looped fit --config {recipe} --print_config\n"
        f"Change one: {prog} {recipe} --model.init_args.config.loops 6 (a key with its dotted path)"
    )


@contextlib.contextmanager
def _exits_zero():
    """jsonargparse's help and --print_config print, then exit 0: carry on after them."""
    try:
        yield
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
