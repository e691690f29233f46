"""Can one CPU dataloader worker feed an H100? Training-sample generation vs consumption, per task.

For each synthetic task (one row of ``TASKS``: a recipe names the task's settings
and the model), this measures the samples/s that its training stream delivers
through the real path — ``TrainStream`` in a ``DataLoader`` with one worker
process, collisions with the evaluation sets redrawn — and sets it next to the
samples/s a training step consumes on an H100, estimated from the model's FLOPs:

    consumed = MFU × peak / (3 × flops_per_token(seq) × seq)     (3: forward + backward)

at 40% MFU of the H100's 989 TFLOP/s dense bf16. The model is the recipe's,
normally the cheapest row of its table (``1⊗1``): it eats samples fastest, so
its headroom is the smallest. A recipe with ``data.train_size`` (the paper's fixed training
set) trains on rows drawn from that set, so its headroom is drawn / consumed; a recipe without
one streams freshly generated samples, generated / consumed. Target ≥ 10×.

    OMP_NUM_THREADS=2 python benchmarks/datagen.py

The last line printed is the smallest headroom.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path
from typing import Optional

import yaml
from torch.utils.data import DataLoader

from looped import LoopedConfig, LoopedTransformer
from looped.datamodules.base import TrainStream

ROOT = Path(__file__).resolve().parents[1]
H100_BF16_DENSE = 989e12  # FLOP/s, SXM, dense
MFU = 0.40

# label, recipe (task settings and model), training batch (None: the recipe's), fixed training set size
# (None: the recipe's data.train_size, if any). Adding a task is one line.
TASKS: list[tuple[str, str, Optional[int], Optional[int]]] = [
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
]
FIXED_SET_CAP = 200_000  # rows of a recipe's fixed training set built here (drawing speed does not depend on it)


def build(recipe: str, batch_size: Optional[int], train_size: Optional[int], fixed_set: bool):
    """The recipe's data module (small eval sets: they only feed the collision check) and its model.

    ``fixed_set``: with the recipe's ``train_size`` (capped), else generating fresh samples.
    """
    config = yaml.safe_load((ROOT / recipe).read_text())
    module, _, name = config["data"]["class_path"].rpartition(".")
    train_size = train_size or config["data"]["init_args"].get("train_size")
    train_size = min(train_size, FIXED_SET_CAP) if (fixed_set and train_size) else None
    args = dict(config["data"]["init_args"], val_size=1024, test_size=1024, num_workers=1, train_size=train_size)
    if batch_size is not None:
        args["batch_size"] = batch_size
    task = getattr(importlib.import_module(module), name)(**args)
    task.setup("fit")  # eval sets built once here, not in the worker
    model_config = dict(config["model"]["init_args"]["config"], vocab_size=task.vocab_size, max_seq_len=task.seq_len)
    return task, LoopedTransformer(LoopedConfig(**model_config))


def generated_per_second(task, seconds: float) -> float:
    """Samples/s out of a one-worker DataLoader over the training stream, after its start-up."""
    loader = DataLoader(TrainStream(task, rank=0, start=0), batch_size=None, num_workers=1)
    batches = iter(loader)
    for _ in range(2):  # worker start and first batches
        next(batches)
    samples, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or samples < 5 * task.batch_size:
        samples += len(next(batches)["input_ids"])
    rate = samples / (time.perf_counter() - start)
    del batches  # stops the worker
    return rate


def consumed_per_second(model: LoopedTransformer, seq_len: int) -> float:
    return MFU * H100_BF16_DENSE / (3 * model.flops_per_token(seq_len) * seq_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="timing window per task")
    args = parser.parse_args()
    print(f"{'task':28} {'batch':>6} {'seq':>5} {'generated/s':>12} {'fixed set/s':>12} {'H100 eats/s':>12} "
          f"{'headroom':>9}")
    worst = None
    for label, recipe, batch_size, train_size in TASKS:
        task, model = build(recipe, batch_size, train_size, fixed_set=False)
        made = generated_per_second(task, args.seconds)
        fixed_task, _ = build(recipe, batch_size, train_size, fixed_set=True)
        drawn = None
        if fixed_task.train_size is not None:
            fixed_task.setup("fit")  # draws the set before the worker forks, as in training
            drawn = generated_per_second(fixed_task, args.seconds)
        eaten = consumed_per_second(model, task.seq_len)
        ratio = (drawn or made) / eaten  # what the recipe's training loop gets
        drawn_text = f"{drawn:>12,.0f}" if drawn else f"{'(streams)':>12}"
        print(f"{label:28} {task.batch_size:>6} {task.seq_len:>5} {made:>12,.0f} {drawn_text} {eaten:>12,.0f} "
              f"{ratio:>8.3g}x")
        if worst is None or ratio < worst[0]:
            worst = (ratio, label)
    print(f"smallest headroom: {worst[0]:.3g}x ({worst[1]}; target >= 10x)")


if __name__ == "__main__":
    main()
