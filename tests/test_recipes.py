"""Every recipe, read the way a run reads it: through the CLI parser, its bases and the code's defaults included.

The golden test pins what each recipe resolves to. ``tests/golden/resolved_recipes/<path under recipes/>``
holds what ``looped fit --config RECIPE --print_config`` prints (without its ``# lightning.pytorch==``
version line); the test resolves every recipe in this one process and compares, ignoring the ``config``
entry (the list of files read). Any change that moves a resolved value fails it: a recipe or a base
edited, a code default changed. When the change is meant, regenerate the files and review their diff:

    python tests/test_recipes.py --update-golden
"""

import sys
from pathlib import Path

import pytest
import yaml

from conftest import GOLDEN, RECIPE_ROWS, RECIPES, resolved, resolved_text
from looped import LoopedLM
from looped.cli import LoopedCLI

UPDATE = "python tests/test_recipes.py --update-golden"
# Pile, LM and retrofit recipes need prepared data (tests/test_pile_recipes.py builds the 1B models on the meta
# device, tests/test_lm_recipes.py trains each LM row on a small prepared folder).
BUILD_ROWS = [p for p in RECIPE_ROWS if not p.relative_to(RECIPES).parts[0].startswith(("pile", "lm", "retrofit"))]
# Every YAML file under recipes/: rows, their bases and the sweep grids.
ALL_FILES = sorted(RECIPES.rglob("*.yaml"))


def name(path: Path) -> str:
    return str(path.relative_to(RECIPES))


@pytest.mark.parametrize("path", BUILD_ROWS, ids=name)
def test_every_recipe_parses_and_builds(path, run_dir):
    """Parse against the code's signatures and instantiate model + data: a recipe can never rot."""
    cli = LoopedCLI(args=["--config", str(path)], run=False)
    assert isinstance(cli.model, LoopedLM)
    config = cli.model.config
    assert config.vocab_size == cli.datamodule.vocab_size  # linked, never typed twice
    assert config.max_seq_len == cli.datamodule.seq_len
    # The optimiser the recipe resolves to (its own or its base's) is the one training builds.
    cli.model.trainer = cli.trainer
    optimizer = cli.model.configure_optimizers()["optimizer"]
    named = cli.config.model.init_args.optimizer
    named = named.class_path if hasattr(named, "class_path") else "torch.optim.AdamW"  # LoopedLM's default
    assert type(optimizer).__name__ == named.rsplit(".", 1)[-1]


@pytest.mark.parametrize("path", ALL_FILES, ids=name)
def test_every_recipe_value_has_a_comment(path):
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        code = line.split("#", 1)[0].strip()
        if code and not code.endswith(":"):
            assert "#" in line, f"{path.name}:{number} has no comment: {line.strip()}"


def _without_config(config: dict) -> dict:
    config = dict(config or {})
    config.pop("config", None)  # the config files read: a row's differ from a flat recipe's by design
    return config


def _differences(expected, actual, key="") -> list[str]:
    """Dotted keys (list items as [i]) whose values differ."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        return [
            d
            for k in {**expected, **actual}
            for d in _differences(
                expected.get(k, "<absent>"), actual.get(k, "<absent>"), f"{key}.{k}" if key else str(k)
            )
        ]
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in _differences(e, a, f"{key}[{i}]")]
    return [] if expected == actual else [f"{key}: {expected!r} -> {actual!r}"]


@pytest.mark.parametrize("path", RECIPE_ROWS, ids=name)
def test_every_recipe_resolves_as_its_golden_file(path):
    golden = GOLDEN / path.relative_to(RECIPES)
    assert golden.exists(), f"no golden file for {name(path)}: run `{UPDATE}`"
    expected = _without_config(yaml.safe_load(golden.read_text()))
    actual = _without_config(resolved(path))
    differences = _differences(expected, actual)
    assert not differences, (
        f"{name(path)} resolves differently from {golden.relative_to(GOLDEN.parents[2])}:\n  "
        + "\n  ".join(differences)
        + f"\nIf the change is meant: `{UPDATE}` and review the diff."
    )


def test_every_golden_file_is_a_recipe():
    recipes = {path.relative_to(RECIPES) for path in RECIPE_ROWS}
    stale = [str(p.relative_to(GOLDEN)) for p in GOLDEN.rglob("*.yaml") if p.relative_to(GOLDEN) not in recipes]
    assert not stale, f"golden files without a recipe: {stale}; run `{UPDATE}`"


def update_golden() -> None:
    """Rewrite every golden file from the recipes as they resolve now; remove those of deleted recipes."""
    for path in RECIPE_ROWS:
        lines = resolved_text(path).splitlines(keepends=True)
        if lines and lines[0].startswith("# lightning.pytorch=="):
            lines = lines[1:]  # the installed version, not the recipe
        golden = GOLDEN / path.relative_to(RECIPES)
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text("".join(lines))
    recipes = {path.relative_to(RECIPES) for path in RECIPE_ROWS}
    for golden in GOLDEN.rglob("*.yaml"):
        if golden.relative_to(GOLDEN) not in recipes:
            golden.unlink()
    print(f"{len(RECIPE_ROWS)} golden files in {GOLDEN}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update-golden"]:
        raise SystemExit(f"usage: {UPDATE}")
    update_golden()
