"""The command line's help texts: ``looped --help``, ``looped run --help`` (the recipe folders), ``lightning --help``.

Kept out of the code path (``looped.cli.app``): text only, built from the tools' docstrings and the recipe folders.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import textwrap
from pathlib import Path

# LightningCLI's subcommands, one line each for `looped --help` (a tool's line is its module docstring's first).
SUBCOMMANDS = {
    "run": "train a recipe, then test its best checkpoint (looped run RECIPE.yaml [--key value ...])",
    "fit": "train a recipe (looped fit --config RECIPE.yaml [--key value ...] [--ckpt_path CKPT])",
    "validate": "evaluate a checkpoint on the validation sets (--config RECIPE.yaml --ckpt_path CKPT)",
    "test": "evaluate a checkpoint on the test sets (--config RECIPE.yaml --ckpt_path CKPT)",
    "predict": "the model's predictions on the data module's predict set",
}


def looped_help(tools: dict[str, str]) -> str:
    lines = [
        "usage: looped SUBCOMMAND [options] [--debug]",
        "",
        "Lightning recipes for looped transformers. `looped SUBCOMMAND --help` shows a subcommand's options.",
        "",
        "subcommands:",
    ]
    entries = {**SUBCOMMANDS, **{name: tool_summary(module) for name, module in tools.items()}}
    width = max(map(len, entries))
    lines += [f"  {name:<{width}}  {text}" for name, text in entries.items()]
    lines += ["", "options:", "  --debug    on an error, show its traceback too (or set LOOPED_DEBUG=1)"]
    return "\n".join(lines)


def tool_summary(module: str) -> str:
    """The first line of a tool module's docstring, read without importing the tool (its imports can be slow)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return ""
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    if first.startswith("``looped") and "``: " in first:  # "``looped report RUNS``: what it does."
        first = first.split("``: ", 1)[1]
    return first.replace("``", "").rstrip(".")


def recipes_dir() -> Path | None:
    """``./recipes`` if there is one, else the repository's (an editable install runs from a clone)."""
    for candidate in (Path.cwd() / "recipes", Path(__file__).resolve().parents[2] / "recipes"):
        if candidate.is_dir():
            return candidate
    return None


def run_help(prog: str = "looped run") -> str:
    lines = [
        f"usage: {prog} RECIPE.yaml [--section.key value ...] [--debug]",
        "",
        "Train a recipe (LightningCLI's fit), then test its best checkpoint and print one table of the",
        "results, a row per evaluation set.",
        "",
    ]
    folder = recipes_dir()
    if folder is not None:
        shown = os.path.relpath(folder) if folder.is_relative_to(Path.cwd()) else str(folder)
        lines.append(f"recipes ({shown}/; rows only, _base.yaml/_cpu.yaml are the shared setups they start from):")
        top = sorted(p.name for p in folder.glob("*.yaml") if not p.name.startswith("_"))
        if top:
            lines.append(
                textwrap.fill(", ".join(top), 100, initial_indent=f"  {'*.yaml':<12} ", subsequent_indent=" " * 15)
            )
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            rows = sorted(p for p in sub.rglob("*.yaml") if not p.name.startswith("_"))
            if sub.name == "sweeps":
                lines.append(f"  {'sweeps/':<12} grids of recipes for `looped sweep`, not recipes")
            elif rows:
                example = os.path.join(shown, rows[0].relative_to(folder))
                lines.append(f"  {sub.name + '/':<12} {len(rows)} recipes, e.g. {example}")
        lines.append("")
    lines += [
        f"A recipe's options, with the values it sets:  {prog} RECIPE.yaml --help",
        "The whole run it stands for, resolved:        looped fit --config RECIPE.yaml --print_config",
        f"Change any value:  {prog} recipes/quickstart.yaml --model.init_args.config.loops 6 --trainer.max_steps 200",
    ]
    return "\n".join(lines)


def lightning_help(sdk_installed: bool) -> str:
    other = (
        "Other subcommands are handed to Lightning AI's cloud CLI (lightning-sdk, installed)."
        if sdk_installed
        else "Other `lightning` subcommands belong to Lightning AI's cloud CLI: pip install lightning-sdk."
    )
    return "\n".join(
        [
            "usage: lightning run RECIPE.yaml [--section.key value ...] [--debug]",
            "",
            "`lightning run RECIPE.yaml` is `looped run RECIPE.yaml`: train the recipe, then test its best checkpoint.",
            "`lightning run --help` lists the recipe folders; `lightning run RECIPE.yaml --help` the recipe's options.",
            other,
        ]
    )
