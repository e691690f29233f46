"""Can one CPU dataloader worker feed an H100? Training-sample generation vs consumption, per task.

For each synthetic task (one row of ``TASKS``: a recipe names the task's settings
and the model; the puzzles, which no recipe trains yet, name both in ``PUZZLES``,
with TRM's network and one supervision step as the model), this measures the
samples/s of its two training paths, each the real one:

* generated: fresh samples, ``TrainStream`` in a ``DataLoader`` with one worker
  process, collisions with the evaluation sets redrawn;
* fixed set (``data.train_size``, what the paper recipes use): the data module's
  own ``train_dataloader()`` (row indices, made in the training process) and its
  ``on_after_batch_transfer`` gathering the rows; timed here on the CPU, where a
  GPU run gathers on the device,

and sets them next to the samples/s a training step consumes on an H100. The
issue's estimate is from the model's FLOPs:

    FLOP bound = MFU × peak / (3 × flops_per_token(seq) × seq)     (3: forward + backward)

at 40% MFU of the H100's 989 TFLOP/s dense bf16. For the 0.1–2M-parameter models
of these tasks that bound asks for 2,000–70,000 optimiser steps/s, which no
training loop runs: Lightning's own per-step host work (hooks, optimiser,
zero_grad, no model at all) takes ~0.5–1 ms. So the run also measures that
floor, side by side on the same host as the loaders, with a real ``Trainer.fit``
of a one-parameter module, and reports

    eaten = min(FLOP bound, batch / loop floor)

with the headroom against it and against the FLOP bound alone. The model is the
recipe's, normally the cheapest row of its table (``1⊗1``): it eats samples
fastest, so its headroom is the smallest. A recipe with ``data.train_size``
trains on rows of that set, a recipe without one on freshly generated samples;
the headroom is what the recipe's path delivers / eaten. Target ≥ 10×.

    OMP_NUM_THREADS=2 python benchmarks/datagen.py

A GPU run's host makes only the row indices of a fixed set (the gather is one kernel on the
device, inside the step), so the run also times that alone (*host*) against the FLOP bound.

The last three lines printed are the smallest host and fixed-set ratios against the FLOP bound alone,
then the smallest headroom.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader

from looped import LoopedConfig, LoopedTransformer
from looped.cli import resolve_recipe
from looped.datamodules.base import TrainStream

ROOT = Path(__file__).resolve().parents[1]
H100_BF16_DENSE = 989e12  # FLOP/s, SXM, dense
MFU = 0.40

# label, recipe (task settings and model), training batch (None: the recipe's), fixed training set size
# (None: the recipe's data.train_size, if any). Adding a task is one line.
TASKS: list[tuple[str, str, int | None, int | None]] = [
    ("PHop p=16", "recipes/phop/p16_1x1.yaml", None, None),
    ("PHop p=32", "recipes/phop/p32_1x1.yaml", None, None),
    # CPU recipes; on a GPU: the paper's p-hop batch and a fixed set (--data.train_size)
    ("GroupComposition S5 n=16", "recipes/groups/s5_n16_1x1.yaml", 256, 4_000_000),
    ("ReasoningPrimitives depth 1", "recipes/primitives/depth1_1x1.yaml", 256, 4_000_000),
    ("NaryAddition", "recipes/addition/1x1.yaml", None, None),
    ("IGSM", "recipes/igsm/1x1.yaml", None, None),
    ("ModularArithmetic cot", "recipes/cot/arithmetic/cot_3x1.yaml", None, None),
    ("LIS cot", "recipes/cot/lis/cot_3x1.yaml", None, None),
    ("EditDistance cot", "recipes/cot/edit_distance/cot_3x1.yaml", None, None),
    # The recursive reasoners' puzzles at the papers' GPU settings (global batch 768). No recipe trains on them
    # yet, so the row names the data module and the model inline (PUZZLES).
    ("Sudoku 9x9 (1k, augmented)", "sudoku", None, None),
    ("Maze-Hard 30x30 (1k)", "maze", None, 1000),
    ("Maze-Hard 30x30 (1k, augmented)", "maze_augmented", None, 1000),
    ("ARC-AGI-1 (1000 variants)", "arc", None, None),
]


def trm(loops: int) -> dict:
    """TRM's network (2 layers, width 512, 8 heads, SwiGLU of expansion 4 rounded up to 1536) applied ``loops``
    times: one supervision step is T·(n+1) applications (Sudoku T=3, n=6; mazes and ARC n=4). Deep supervision
    replaces a row's sample only when it halts, so a step eats at most ``batch`` new samples: the bound here."""
    return dict(d_model=512, n_heads=8, d_ff=1536, activation="swiglu", norm="rmsnorm", block_layers=2, loops=loops)


def puzzle(class_path: str, loops: int, **init_args) -> dict:
    return {"data": {"class_path": class_path, "init_args": init_args}, "model": {"init_args": {"config": trm(loops)}}}


HARD_MAZE = dict(size=30, min_path=111, batch_size=768, val_size=64, test_size=64)
PUZZLES = {
    "sudoku": puzzle(
        "looped.datamodules.Sudoku",
        21,
        size=9,
        givens=36,
        train_puzzles=1000,
        batch_size=768,
        val_size=64,
        test_size=64,
    ),
    "maze": puzzle("looped.datamodules.Maze", 15, **HARD_MAZE),
    "maze_augmented": puzzle("looped.datamodules.Maze", 15, augment=True, **HARD_MAZE),
    "arc": puzzle("looped.datamodules.Arc", 15, version="arc1", augmentations=1000, batch_size=768),
}
FIXED_SET_CAP = 200_000  # rows of a recipe's fixed training set built here (drawing speed does not depend on it)


def build(recipe: str, batch_size: int | None, train_size: int | None, fixed_set: bool):
    """The recipe's data module (small eval sets: they only feed the collision check) and its model.

    ``recipe``: a recipe's path, or a key of ``PUZZLES``. ``fixed_set``: with the recipe's ``train_size``
    (capped), else generating fresh samples; ``(None, None)`` when it has none.
    """
    if recipe in PUZZLES:
        config, sizes = PUZZLES[recipe], {}  # their own evaluation sets: puzzle pools are drawn serially
    else:
        config = yaml.safe_load(resolve_recipe(str(ROOT / recipe)))  # the recipe's base and defaults included
        sizes = dict(val_size=1024, test_size=1024)
    module, _, name = config["data"]["class_path"].rpartition(".")
    train_size = train_size or config["data"]["init_args"].get("train_size")
    if fixed_set and not train_size:
        return None, None
    train_size = min(train_size, FIXED_SET_CAP) if (fixed_set and train_size) else None
    args = dict(config["data"]["init_args"], **sizes, num_workers=1, train_size=train_size)
    if batch_size is not None:
        args["batch_size"] = batch_size
    task = getattr(importlib.import_module(module), name)(**args)
    task.setup("fit")  # eval sets built once here, not in the worker
    model_config = dict(config["model"]["init_args"]["config"], vocab_size=task.vocab_size, max_seq_len=task.seq_len)
    return task, LoopedTransformer(LoopedConfig(**model_config))


def samples_per_second(task, loader, seconds: float, gather: bool = True) -> float:
    """Samples/s of training batches after the loader's start-up.

    ``gather``: as the training step receives them (fixed-set rows gathered, here on the CPU);
    else the loader's batches as they leave the host (a fixed set's row indices). Every training
    batch holds ``batch_size`` samples, so runs of batches are timed whole: the clock and the
    count stay out of the rate they measure.
    """
    batches = iter(loader)
    if gather:
        batches = (task.on_after_batch_transfer(batch, 0) for batch in batches)
    for _ in range(2):  # worker start and first batches
        first = next(batches)
    assert len(first["input_ids"] if gather else first["rows"]) == task.batch_size
    run = 32  # batches between looks at the clock
    count, start, elapsed = 0, time.perf_counter(), 0.0
    while elapsed < seconds:
        for _ in itertools.islice(batches, run):
            pass
        count += run
        elapsed = time.perf_counter() - start
    del batches  # stops a worker
    return count * task.batch_size / elapsed


def generated_per_second(task, seconds: float) -> float:
    """Fresh samples through a one-worker DataLoader over the training stream."""
    loader = DataLoader(TrainStream(task, rank=0, start=0), batch_size=None, num_workers=1)
    return samples_per_second(task, loader, seconds)


def fixed_set_per_second(task, seconds: float) -> float:
    """Rows of the fixed training set through the data module's own training loader, gathered on the CPU."""
    return samples_per_second(task, task.train_dataloader(), seconds)


def host_rows_per_second(task, seconds: float) -> float:
    """Row indices of the fixed set the training process makes: a GPU run's whole host-side data work."""
    return samples_per_second(task, task.train_dataloader(), seconds, gather=False)


def flop_bound_per_second(model: LoopedTransformer, seq_len: int) -> float:
    return MFU * H100_BF16_DENSE / (3 * model.flops_per_token(seq_len) * seq_len)


class _NoModel(L.LightningModule):
    """One parameter, a step that only touches it: what remains is the loop's own per-step work."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return self.weight.sum()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters())


class _StepTimer(L.Callback):
    def __init__(self, skip: int) -> None:
        self.skip, self.start, self.seconds_per_step = skip, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.skip:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds_per_step = (time.perf_counter() - self.start) / (trainer.global_step - self.skip)


def loop_floor_seconds(steps: int = 2000) -> float:
    """Seconds per step of Lightning's training loop around a model that does nothing (one batch, reused)."""
    batch = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}
    timer = _StepTimer(skip=100)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps + timer.skip,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_NoModel(), train_dataloaders=itertools.repeat(batch))
    return timer.seconds_per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="timing window per task")
    parser.add_argument(
        "--only",
        action="append",
        metavar="LABEL",
        help="measure only the tasks whose label contains LABEL (repeatable; default: all)",
    )
    parser.add_argument("--floor-steps", type=int, default=2000, help="steps timed for the Lightning loop floor")
    args = parser.parse_args()
    tasks = [row for row in TASKS if not args.only or any(part in row[0] for part in args.only)]
    if not tasks:
        parser.error(f"--only {args.only} matches no task; the labels are: {', '.join(row[0] for row in TASKS)}")
    floor = loop_floor_seconds(args.floor_steps)
    print(f"Lightning loop floor: {floor * 1e6:.0f} µs per step on this host")
    print(
        f"{'task':32} {'batch':>6} {'seq':>5} {'generated/s':>12} {'fixed set/s':>12} {'FLOP bound/s':>13} "
        f"{'loop bound/s':>13} {'headroom':>9} {'vs FLOPs':>9} {'host/s':>13} {'host vs FLOPs':>13}"
    )
    worst: dict[str, tuple[float, str]] = {}
    for label, recipe, batch_size, train_size in tasks:
        task, model = build(recipe, batch_size, train_size, fixed_set=False)
        made = generated_per_second(task, args.seconds)
        fixed_task, _ = build(recipe, batch_size, train_size, fixed_set=True)
        drawn = host = None
        if fixed_task is not None:
            fixed_task.setup("fit")  # draws the set, as in training
            drawn = fixed_set_per_second(fixed_task, args.seconds)
            # Rows gathered on the device: the host makes their indices; rows moved by an augmentation
            # (Maze's) are made whole on the host, as measured.
            host = host_rows_per_second(fixed_task, args.seconds) if fixed_task.serves_rows else drawn
        flop_bound = flop_bound_per_second(model, task.seq_len)
        loop_bound = task.batch_size / floor
        delivered = drawn or made  # what the recipe's training loop gets
        from_host = host or made  # what a GPU run's host must make: row indices, or the samples themselves
        ratios = {
            "headroom": delivered / min(flop_bound, loop_bound),
            "vs FLOPs": delivered / flop_bound,
            "host vs FLOPs": from_host / flop_bound,
        }
        drawn_text = f"{drawn:>12,.0f}" if drawn else f"{'(streams)':>12}"
        host_text = f"{host:>13,.0f}" if host else f"{'(streams)':>13}"
        print(
            f"{label:32} {task.batch_size:>6} {task.seq_len:>5} {made:>12,.0f} {drawn_text} {flop_bound:>13,.0f} "
            f"{loop_bound:>13,.0f} {ratios['headroom']:>8.3g}x {ratios['vs FLOPs']:>8.3g}x {host_text} "
            f"{ratios['host vs FLOPs']:>12.3g}x"
        )
        for name, ratio in ratios.items():
            if name not in worst or ratio < worst[name][0]:
                worst[name] = (ratio, label)
    for name in ("host vs FLOPs", "vs FLOPs", "headroom"):  # the headroom, the number this exists for, last
        ratio, label = worst[name]
        print(f"smallest {name}: {ratio:.3g}x ({label}; target >= 10x)")


if __name__ == "__main__":
    main()
