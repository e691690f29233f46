"""The crash-safe checkpoint save against Lightning's own, side by side: the cost of surviving a kill.

Both rows save the same trainer state (a ``LoopedLM`` after one AdamW step: weights and two moment buffers)
into the same folder, alternately, ``--rounds`` times each (medians; each row leads a round in turn):

* ``lightning``: ``trainer.save_checkpoint(path)`` — Lightning's fsspec transaction (a temporary file in the
  system's temporary folder, moved into place; no fsync);
* ``crash-safe``: ``looped.training.saving.save_checkpoint(trainer, path)`` — the same write under a temporary
  name beside ``path``, published by a rename once complete (what ``looped.callbacks.Checkpoint`` and
  ``InterruptCheckpoint`` do);
* ``crash-safe + fsync``: the same, the file and the folder synced to the disk before the rename
  (``Checkpoint(fsync=True)``: survives a power loss too).

    python benchmarks/checkpoint_save.py --d-model 1024 --layers 4 --rounds 5

The last line is the ratio crash-safe / lightning (the target: at most 1.1x); the line before it, with fsync.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from looped import LoopedConfig, LoopedLM
from looped.datamodules import PHop
from looped.training.saving import save_checkpoint


def trained_trainer(d_model: int, layers: int, root: Path) -> L.Trainer:
    """A trainer after one step of a (layers⊗1) model of width d_model (so the optimiser state exists)."""
    data = PHop(length=16, hops=2, batch_size=4, val_size=8, test_size=8)
    config = LoopedConfig(
        vocab_size=data.vocab_size,
        max_seq_len=data.seq_len,
        d_model=d_model,
        n_heads=max(1, d_model // 64),
        d_ff=4 * d_model,
        block_layers=layers,
        loops=1,
    )
    model = LoopedLM(config, warmup_steps=1, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    return trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        root = Path(folder)
        trainer = trained_trainer(args.d_model, args.layers, root)
        rows = {
            "lightning": lambda path: trainer.save_checkpoint(path),
            "crash-safe": lambda path: save_checkpoint(trainer, path),
            "crash-safe + fsync": lambda path: save_checkpoint(trainer, path, fsync=True),
        }
        times: dict[str, list[float]] = {name: [] for name in rows}
        names = list(rows)
        for round_ in range(args.rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:  # each row leads in turn
                path = root / f"{name.replace(' + ', '_')}.ckpt"  # replaced every round, as last.ckpt is
                start = time.perf_counter()
                rows[name](path)
                times[name].append(time.perf_counter() - start)
        size = (root / "lightning.ckpt").stat().st_size
        params = sum(p.numel() for p in trainer.lightning_module.parameters())
        print(f"checkpoint of {params / 1e6:.2f}M parameters with AdamW state: {size / 2**20:.1f} MiB")
        print(f"{'row':<20} {'median s':>9} {'MiB/s':>8}")
        median = {name: statistics.median(values) for name, values in times.items()}
        for name, seconds in median.items():
            print(f"{name:<20} {seconds:>9.3f} {size / 2**20 / seconds:>8.0f}")
        with_fsync = median["crash-safe + fsync"] / median["lightning"]
        print(f"crash-safe + fsync / lightning save time: {with_fsync:.2f}x")
        print(f"crash-safe / lightning save time: {median['crash-safe'] / median['lightning']:.2f}x")


if __name__ == "__main__":
    main()
