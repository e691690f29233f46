"""``looped sweep SWEEP.yaml``: run a grid of recipe variants, one run directory per cell.

A sweep file names, per task, a base recipe and its problem sizes, and any number of
further axes, each a mapping from a label to the recipe overrides it stands for::

    name: efficient_cot                       # runs/<name>/<cell>/version_N/
    metric: test/answer_accuracy              # what decides "solved" in the report
    solved_at: 0.9
    overrides: {trainer.max_steps: 2000}      # applied to every cell
    tasks:
      lis: {recipe: recipes/cot/lis/cot_3x1.yaml, size_key: data.init_args.size, sizes: [50, 80, 100]}
    axes:
      mixer:
        softmax: {model.init_args.config.attention: softmax}
        hybrid: {model.init_args.config.attention: [linear, softmax]}
      width:
        64: {model.init_args.config.d_model: 64}

Every cell is ``looped run RECIPE --key value ...`` in its own process (``--jobs N`` at a
time, the cores split between them), logging to ``runs/<name>/<cell>/``; its coordinates
go to ``<cell>/cell.json``, which ``looped report`` reads to draw the width × size heatmap.
Finished cells (a test metric in their logs) are skipped, so an interrupted sweep is
resumed by running the same command again. ``--print`` writes one command per cell instead
of running them: one line per job of a SLURM array or any other scheduler.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CELL_FILE = "cell.json"


@dataclass
class Cell:
    """One run of the sweep: a task at one size and one label per axis."""

    task: str
    size: Any
    labels: dict[str, str]  # axis -> label
    recipe: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        parts = [self.task, f"size{self.size}", *(f"{axis}_{label}" for axis, label in self.labels.items())]
        return "-".join(str(p).replace("/", "_").replace(" ", "") for p in parts)

    def coordinates(self) -> dict[str, Any]:
        return {"task": self.task, "size": self.size, **self.labels}


@dataclass
class Sweep:
    name: str
    cells: list[Cell]
    runs_dir: Path
    metric: str = "test/answer_accuracy"
    solved_at: float = 0.9

    def cell_dir(self, cell: Cell) -> Path:
        return self.runs_dir / self.name / cell.name

    def command(self, cell: Cell) -> list[str]:
        args = [sys.executable, "-m", "looped.cli", "run", cell.recipe]
        for key, value in cell.overrides.items():
            args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
        # Every recipe logs with TensorBoardLogger: point it at the cell's own directory.
        args += [
            "--trainer.logger.init_args.save_dir",
            str(self.runs_dir / self.name),
            "--trainer.logger.init_args.name",
            cell.name,
        ]
        return args


def _need(ok: bool, where: str, fix: str) -> None:
    if not ok:
        raise ValueError(f"sweep file: {where}: {fix}")


def load_sweep(path: str | Path, runs_dir: str | Path = "runs") -> Sweep:
    """Expand a sweep file into its cells; every mistake is reported before anything runs."""
    path = Path(path)
    _need(path.exists(), str(path), "no such file")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - {"name", "metric", "solved_at", "overrides", "tasks", "axes"}
    _need(not unknown, f"keys {sorted(unknown)}", "unknown; use name, metric, solved_at, overrides, tasks, axes")
    _need(isinstance(spec.get("name"), str) and spec["name"], "name", "give the sweep a name (its runs directory)")
    tasks = spec.get("tasks") or {}
    _need(isinstance(tasks, dict) and tasks, "tasks", "name at least one task: {label: {recipe, sizes}}")
    axes = spec.get("axes") or {}
    _need(isinstance(axes, dict), "axes", "a mapping {axis: {label: {override: value}}}")
    for axis, values in axes.items():
        _need(isinstance(values, dict) and values, f"axes.{axis}", "a non-empty mapping {label: {override: value}}")
        for label, overrides in values.items():
            _need(isinstance(overrides, dict), f"axes.{axis}.{label}", "a mapping of recipe overrides")
    shared = spec.get("overrides") or {}
    cells = []
    for task, task_spec in tasks.items():
        _need(isinstance(task_spec, dict) and "recipe" in task_spec, f"tasks.{task}", "needs recipe: PATH")
        recipe = Path(task_spec["recipe"])
        if not recipe.is_absolute() and not recipe.exists():
            recipe = Path(os.path.normpath(path.parent / recipe))  # relative to the sweep file
        _need(recipe.exists(), f"tasks.{task}.recipe", f"{task_spec['recipe']} does not exist")
        sizes = task_spec.get("sizes") or [None]
        size_key = task_spec.get("size_key", "data.init_args.size")
        for size in sizes:
            for combo in itertools.product(*(values.items() for values in axes.values())):
                overrides = dict(shared)
                overrides.update(task_spec.get("overrides") or {})
                if size is not None:
                    overrides[size_key] = size
                for _, axis_overrides in combo:
                    overrides.update(axis_overrides)
                labels = {axis: str(label) for axis, (label, _) in zip(axes, combo)}
                cells.append(Cell(task, size, labels, str(recipe), overrides))
    return Sweep(
        spec["name"],
        cells,
        Path(runs_dir),
        spec.get("metric", "test/answer_accuracy"),
        float(spec.get("solved_at", 0.9)),
    )


def finished(cell_dir: Path, metric: str) -> bool:
    """A cell is done when one of its versions logged the sweep's test metric."""
    from looped.tools.report import find_version_dirs, read_scalars

    if not cell_dir.exists():
        return False
    return any(metric in read_scalars(v) for v in find_version_dirs([cell_dir]))


def run_cell(sweep: Sweep, cell: Cell, threads: int) -> tuple[Cell, int, float]:
    cell_dir = sweep.cell_dir(cell)
    cell_dir.mkdir(parents=True, exist_ok=True)
    record = {"sweep": sweep.name, "metric": sweep.metric, "solved_at": sweep.solved_at, "cell": cell.coordinates()}
    (cell_dir / CELL_FILE).write_text(json.dumps(record, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(cell_dir / "log.txt", "w") as log:
        code = subprocess.call(sweep.command(cell), stdout=log, stderr=subprocess.STDOUT, env=env)
    return cell, code, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="looped sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="the sweep file (e.g. recipes/sweeps/efficient_cot_cpu.yaml)")
    parser.add_argument("--runs-dir", default="runs", help="parent of the sweep's run directories")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once; the CPU cores are split between them")
    parser.add_argument("--print", action="store_true", help="print one command per unfinished cell, run nothing")
    parser.add_argument("--only", action="append", default=[], help="run cells whose name contains this (repeatable)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sweep = load_sweep(args.sweep, args.runs_dir)
    except ValueError as err:
        raise SystemExit(f"looped sweep: {err}") from err
    cells = [c for c in sweep.cells if not args.only or any(s in c.name for s in args.only)]
    todo = [c for c in cells if not finished(sweep.cell_dir(c), sweep.metric)]
    print(
        f"looped sweep {sweep.name}: {len(cells)} cells, {len(cells) - len(todo)} finished, {len(todo)} to run",
        file=sys.stderr,
    )
    if args.print:
        for cell in todo:
            print(shlex.join(sweep.command(cell)))
        return
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    failed = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for cell, code, seconds in pool.map(lambda c: run_cell(sweep, c, threads), todo):
            status = "ok" if code == 0 else f"FAILED (exit {code}, see {sweep.cell_dir(cell) / 'log.txt'})"
            print(f"{cell.name}: {status} in {seconds:.0f} s", file=sys.stderr)
            if code != 0:
                failed.append(cell.name)
    if failed:
        raise SystemExit(f"looped sweep: {len(failed)} cells failed: {', '.join(failed)}")
    print(
        f"looped sweep: done; `looped report {sweep.runs_dir / sweep.name} --output DIR` draws the heatmap",
        file=sys.stderr,
    )
