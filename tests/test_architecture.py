"""The package's shape, checked from its source: imports point one way and never in a circle.

Layers, lowest first (a module may import its own layer and those below, never one above); each is a folder:

0. leaves — ``looped.contract``, ``looped.errors``, ``looped.tokenizer``, ``looped.moved``, ``looped.tools.plots``:
   nothing of looped;
1. the model and its decoding — ``looped.model`` (config, transformer, the loop step, cache, mixers) and
   ``looped.decoding``: torch only;
2. the model as a ``transformers`` model — ``looped.hf`` — and conversion from other checkpoints —
   ``looped.convert``: the model plus ``transformers``, no Lightning;
3. the training core — ``looped.training`` (``LoopedLM`` and what it trains with) and ``looped.evaluation``
   (per-loop readout, exits, scoring by generation);
4. data and callbacks — ``looped.datamodules``, ``looped.callbacks``;
5. tools and the command line — ``looped.tools``, ``looped.cli``.

``looped/__init__.py`` is the facade that re-exports from every layer, so it is left out.
"""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from looped.moved import MOVED

# Source folder -> the import name it installs as (pyproject's package-dir).
PACKAGES = {"looped": "looped", "datamodules": "looped.datamodules", "callbacks": "looped.callbacks"}
LEAVES = {"looped.contract", "looped.errors", "looped.tokenizer", "looped.moved", "looped.tools.plots"}
MODEL = ("looped.model", "looped.decoding")
HF = ("looped.hf", "looped.convert")
TRAINING = ("looped.training", "looped.evaluation")
DATA_AND_CALLBACKS = ("looped.datamodules", "looped.callbacks")
TOOLS = ("looped.tools", "looped.cli")


def module_files() -> dict[str, Path]:
    """Every module of the installed package, by import name."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


MODULES = module_files()


def imports_of(path: Path) -> set[str]:
    """The looped modules a file imports, at module level or inside a function (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from looped.tools import report` imports the module looped.tools.report
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names
            ]
        else:
            continue
        found |= {name for name in names if name in MODULES}
    return found


GRAPH = {name: imports_of(path) for name, path in MODULES.items() if name != "looped"}


def layer(module: str) -> int:
    if module in LEAVES:
        return 0
    for rank, prefixes in enumerate((MODEL, HF, TRAINING, DATA_AND_CALLBACKS, TOOLS), start=1):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to one in {__file__}")


def test_every_module_belongs_to_a_layer():
    for module in GRAPH:
        layer(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_a_layer_above_its_own(module):
    above = {m for m in GRAPH[module] if m != "looped" and layer(m) > layer(module)}
    assert not above, f"{module} (layer {layer(module)}) imports {sorted(above)} from a layer above"


def test_leaves_import_nothing_of_looped():
    for leaf in LEAVES:
        assert GRAPH[leaf] == set(), f"{leaf} imports {GRAPH[leaf]}"


def test_no_import_cycle():
    """Depth-first search for a back edge; the cycle is named if there is one."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_checks_see_a_cycle_and_a_wrong_way_import(monkeypatch):
    """The two checks above can fail: an edge from the model back up to training trips both."""
    monkeypatch.setitem(GRAPH, "looped.model", GRAPH["looped.model"] | {"looped.training.module"})
    with pytest.raises(AssertionError, match="import cycle: .*looped.model"):
        test_no_import_cycle()
    with pytest.raises(AssertionError, match="from a layer above"):
        test_no_module_imports_a_layer_above_its_own("looped.model")


def test_the_model_needs_only_torch():
    """``import looped.model`` loads no Lightning (inference, export and other code embed the model alone);
    ``import looped`` loads no ``transformers`` either (it only hooks its registration); the ``transformers``
    wrapper ``looped.hf.modeling`` loads no Lightning. One process, imported in that order."""
    steps = [("looped.model", ("lightning", "torchmetrics", "transformers")), ("looped", ("transformers",))]
    if importlib.util.find_spec("transformers") is not None:  # the [hf] extra
        steps.append(("looped.hf.modeling", ("lightning", "torchmetrics")))
    code = "import importlib, sys\n" + "".join(
        f"importlib.import_module({module!r}); print({module!r}, [m for m in {banned!r} if m in sys.modules])\n"
        for module, banned in steps
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{module} []" for module, _ in steps]


def test_public_paths_that_recipes_and_saved_configs_name_still_resolve():
    import importlib

    for path in (
        "looped.LoopedLM",
        "looped.LoopedConfig",
        "looped.module.batch_size",
        "looped.module.batch_tokens",
        "looped.optim.Adafactor",
        "looped.halting.ExitObjective",
        "looped.loop_schedule.LoopSchedule",
        "looped.regularizer.BlockRegularizer",
        "looped.datamodules.PHop",
        "looped.datamodules.PileDataModule",
        "looped.callbacks.PerLoopAccuracy",
        "looped.callbacks.InterruptCheckpoint",
    ):
        module, _, name = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name)), path


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_moved_module_is_the_same_module_under_its_old_path(old):
    """An old path loads the module at its new one (no second copy: its classes are the same classes)."""
    import importlib

    module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert module.__spec__.name == MOVED[old]  # pickling and tracebacks see where it lives


def block_applications() -> list[str]:
    """Every place in the package that applies the shared block: a ``for`` over something named ``block`` whose
    body calls its loop variable (``for layer in self.block: x = layer(x, ...)``), as ``file:function``."""
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for function in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
            for loop in [n for n in ast.walk(function) if isinstance(n, ast.For)]:
                over_block = any(isinstance(n, ast.Attribute) and n.attr == "block" for n in ast.walk(loop.iter))
                targets = {n.id for n in ast.walk(loop.target) if isinstance(n, ast.Name)}
                calls = {
                    n.func.id
                    for n in ast.walk(ast.Module(loop.body, []))
                    if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                }
                if over_block and targets & calls:
                    found.append(f"{name}:{function.name}")
    return found


def test_the_block_is_applied_in_one_place_the_loop_step():
    """Training, evaluation, both decoding schedules and the transformers model all go through ``loop_step``."""
    assert block_applications() == ["looped.model.transformer:loop_step"]


def test_the_one_place_check_sees_a_second_block_loop(monkeypatch, tmp_path):
    """The check above can fail: a decoder that loops over the block itself is found."""
    rogue = tmp_path / "rogue.py"
    rogue.write_text("def step(model, x):\n    for layer in model.block:\n        x = layer(x)\n    return x\n")
    monkeypatch.setitem(MODULES, "looped.decoding.rogue", rogue)
    assert "looped.decoding.rogue:step" in block_applications()


def test_every_package_folder_is_installed():
    """A folder missing from pyproject's ``packages`` works in an editable install and vanishes from a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert folders == listed
