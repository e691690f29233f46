"""``looped new task NAME --package PKG``: the skeleton of a task in your own package, ready to run.

Writes, from the working directory (which ``looped`` searches for ``PKG``, docs/extending.md):

* ``PKG/NAME.py`` — a ``SyntheticTask`` subclass that already works (it reverses a string of digits);
  replace its ``vocab``, ``seq_len`` and ``generate`` with your task;
* ``recipes/NAME.yaml`` — a recipe naming it, inheriting ``recipes/_base.yaml`` (written too if it is not
  there: the trainer, checkpoints and per-loop accuracy every recipe of the package shares);
* ``tests/test_NAME.py`` — the task's samples against a slow reference, and the recipe resolved.

Then ``looped run recipes/NAME.yaml`` trains it and ``python -m pytest tests/test_NAME.py`` tests it.
Nothing is overwritten: an existing file stops the command before anything is written.
"""

from __future__ import annotations

import argparse
import keyword
from pathlib import Path

from looped.errors import InputError

TASK = '''"""{title}: read n digits, then write them back in reverse order. Replace it with your task."""

import numpy as np

from looped.contract import IGNORE
from looped.datamodules import SyntheticTask
from looped.errors import InputError


class {cls}(SyntheticTask):
    """``x_1 … x_n = y_1 … y_n-1``: after ``=`` and after each y_i the label is the next reversed digit.

    Args:
        length: n, the digits per sample.
        **kwargs: batch sizes, evaluation set sizes, seed (see ``SyntheticTask``).
    """

    def __init__(self, length: int = 8, **kwargs) -> None:
        super().__init__(**kwargs)
        if length < 2:
            raise InputError(f"data.length must be at least 2, got {{length}}")  # one line, exit status 2
        self.length = length

    @property
    def vocab(self) -> list[str]:
        """Token strings; a token's id is its index."""
        return [str(digit) for digit in range(10)] + ["="]

    @property
    def seq_len(self) -> int:
        return 2 * self.length

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` samples at once: ``input_ids`` and ``labels`` ``[n seq_len]``, labels ``IGNORE`` where no loss."""
        digits = rng.integers(0, 10, size=(n, self.length))
        answer = digits[:, ::-1]
        input_ids = np.concatenate([digits, np.full((n, 1), 10), answer[:, :-1]], axis=1)  # 10 is "="
        labels = np.full_like(input_ids, IGNORE)
        labels[:, self.length :] = answer
        return input_ids, labels
'''

BASE = """# What every recipe of {package} shares; a row states only what differs.
seed_everything: 0                      # model init
trainer:
  precision: 32-true                    # fp32 (bf16 matmul is slow on CPUs)
  max_steps: 600                        # optimiser steps (the data stream is endless)
  val_check_interval: 100               # validate every 100 steps ...
  check_val_every_n_epoch: null         # ... counted in steps
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: runs}}         # runs/<name>/version_N/
  callbacks:
    - class_path: looped.callbacks.PerLoopAccuracy # accuracy after every loop 1..2L
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{monitor: val/exact_match, mode: max, save_last: true}} # best and last.ckpt
model:
  class_path: looped.LoopedLM           # or a subclass of your own
  init_args:
    config: {{d_model: 64, n_heads: 4, d_ff: 256, block_layers: 1, loops: 4}} # (1⊗4)
    optimizer:
      class_path: torch.optim.AdamW
      init_args: {{lr: 0.003}}
"""

RECIPE = """# {title} with a (1⊗4) looped transformer:  looped run recipes/{name}.yaml
config: _base.yaml                      # the package's shared trainer, model and callbacks
trainer.logger.init_args.name: {name}   # runs/{name}/version_N/
data:
  class_path: {package}.{module}.{cls}  # the task
  init_args: {{length: 8, val_size: 256, test_size: 256}}
"""

TEST = '''"""{title}: every sample against a slow reference, and the recipe as `looped run` reads it."""

from pathlib import Path

import numpy as np

from looped.cli import resolve_recipe
from {package}.{module} import {cls}

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "{name}.yaml"


def test_samples_match_a_slow_reference():
    task = {cls}(length=5, val_size=16, test_size=16)
    input_ids, labels = task.generate(np.random.default_rng(0), 40)
    for row, label in zip(input_ids.tolist(), labels.tolist()):
        digits = row[:5]
        assert row[5] == 10 and row[6:] == digits[::-1][:-1]
        assert label == [-100] * 5 + digits[::-1]


def test_the_recipe_resolves():
    assert "class_path: {package}.{module}.{cls}" in resolve_recipe(str(RECIPE))
'''


def files(name: str, package: str) -> dict[Path, str]:
    """What ``looped new task NAME --package PKG`` writes, path by path (``_base.yaml`` only if missing)."""
    cls = "".join(part.capitalize() for part in name.split("_"))
    values = {"name": name, "package": package, "module": name, "cls": cls, "title": cls}
    written = {
        Path(package) / f"{name}.py": TASK.format(**values),
        Path("recipes") / f"{name}.yaml": RECIPE.format(**values),
        Path("tests") / f"test_{name}.py": TEST.format(**values),
    }
    if not (Path("recipes") / "_base.yaml").exists():
        written[Path("recipes") / "_base.yaml"] = BASE.format(**values)
    if not (Path(package) / "__init__.py").exists():
        written[Path(package) / "__init__.py"] = ""
    return written


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="looped new", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["task"], help="what to start: a task")
    parser.add_argument("name", help="the task's module name, e.g. reverse or my_task")
    parser.add_argument("--package", required=True, help="your package's folder, in the working directory")
    args = parser.parse_args(argv)
    for flag, value in (("NAME", args.name), ("--package", args.package)):
        if not value.isidentifier() or keyword.iskeyword(value) or not value.islower():
            raise InputError(f"{flag}: {value!r} is not a lower-case Python module name; e.g. my_task")
    planned = files(args.name, args.package)
    existing = [str(path) for path in planned if path.exists()]
    if existing:
        raise InputError(f"looped new task: {', '.join(existing)} already exist; nothing written (pick another NAME)")
    for path, text in planned.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    print(f"next: looped run recipes/{args.name}.yaml   and   python -m pytest tests/test_{args.name}.py")
