"""One FSDP2 training run on CPU processes over gloo, for tests/test_distributed.py.

    python tests/fsdp_run.py OUT TAG --devices 2 --max-steps 6 [--resume CKPT] [--save CKPT]

Lightning launches the other ranks itself (it re-runs this script with LOCAL_RANK set),
exactly as ``looped fit --trainer.devices 2`` would. Rank 0 writes ``OUT/TAG.pt``:
per-step losses of every rank, the full (gathered) weights at train start and at the end,
and, for the first step, the global batch and the gathered gradients.
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy

from looped import LoopedConfig, LoopedLM
from looped.datamodules import PHop
from looped.training.optim import Adafactor
from looped.training.parallel import full_state_dict
from looped.training.regularizer import BlockRegularizer

DECAY_STEPS = 12  # fixed, so runs of different max_steps follow one schedule


def data() -> PHop:
    return PHop(alphabet_size=4, length=12, hops=2, batch_size=4, val_size=8, test_size=8)


ROUTED = {"router": "expert_choice", "router_capacity": [1.0, 0.5, 0.25]}  # --router: Mixture-of-Recursions


def config(vocab_size: int, seq_len: int, **fields) -> LoopedConfig:
    # (2⊗3) with one unshared prelude layer: the shared block is used three times per forward.
    return LoopedConfig(
        vocab_size=vocab_size,
        max_seq_len=seq_len,
        d_model=32,
        n_heads=4,
        d_ff=64,
        block_layers=2,
        loops=3,
        prelude_layers=1,
        **fields,
    )


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.record = {"losses": [], "grads": None, "batch": None}

    def on_train_start(self, trainer, pl_module):
        self.record["start"] = full_state_dict(pl_module.model)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.record["batch"] is None:
            self.record["batch"] = gather({k: v.cpu() for k, v in batch.items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.record["grads"] is None:
            from torch.distributed.tensor import DTensor

            self.record["grads"] = {
                name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().cpu().clone()
                for name, p in pl_module.model.named_parameters()
            }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.record["losses"].append(gather(float(outputs["loss"])))

    def on_train_end(self, trainer, pl_module):
        self.record["end"] = full_state_dict(pl_module.model)


def penalty_check(mesh) -> dict:
    """BlockRegularizer.penalty on FSDP2-sharded weights vs. the same weights unsharded (value and gradient)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from looped.model import LoopedTransformer

    torch.manual_seed(1)
    c = LoopedConfig(vocab_size=7, max_seq_len=8, d_model=16, n_heads=2, d_ff=40, block_layers=4, loops=1)
    plain = LoopedTransformer(c)
    sharded = LoopedTransformer(c)
    sharded.load_state_dict(plain.state_dict())
    for layer in sharded.block:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    regularizer = BlockRegularizer(block_layers=2, groups=["q", "o", "w1", "w2", "attn_norm"])
    expected = regularizer.penalty(plain.block)
    expected.backward()
    value = regularizer.penalty(sharded.block)
    value.backward()
    grads = {n: p.grad.full_tensor() for n, p in sharded.named_parameters() if isinstance(p.grad, DTensor)}
    worst = max((grads[n] - p.grad).abs().max().item() for n, p in plain.named_parameters() if n in grads)
    return {"value": value.item(), "expected": expected.item(), "grad_error": worst, "graded": len(grads)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("tag")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--resume")
    parser.add_argument("--save")
    parser.add_argument("--penalty", action="store_true")
    parser.add_argument("--hsdp", action="store_true", help="ModelParallelStrategy's default 2-D mesh (HSDP)")
    parser.add_argument(
        "--adafactor", action="store_true", help="looped.training.optim.Adafactor (the Pile recipes') instead of AdamW"
    )
    parser.add_argument("--router", action="store_true", help="an expert-choice router (tokens gathered per loop)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every layer (LoopedLM compile)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0)
    datamodule = data()
    recorder = Recorder()
    trainer = L.Trainer(
        default_root_dir=args.out,
        accelerator="cpu",
        devices=args.devices,
        strategy=ModelParallelStrategy() if args.hsdp else ModelParallelStrategy(args.devices, tensor_parallel_size=1),
        precision="32-true",
        max_steps=args.max_steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    # Built on the meta device: configure_model shards it, then each rank materialises its shards.
    with trainer.init_module(empty_init=True):
        module = LoopedLM(
            config(datamodule.vocab_size, datamodule.seq_len, **(ROUTED if args.router else {})),
            warmup_steps=2,
            decay_steps=DECAY_STEPS,
            activation_checkpointing=not args.compile,
            compile=args.compile,
            **({"optimizer": functools.partial(Adafactor, lr=0.01)} if args.adafactor else {}),
        )
    assert next(module.model.parameters()).is_meta
    trainer.fit(module, datamodule=datamodule, ckpt_path=args.resume)
    if args.save:
        trainer.save_checkpoint(args.save)
    if args.penalty:
        recorder.record["penalty"] = penalty_check(trainer.strategy.device_mesh["data_parallel"])
    recorder.record["mesh"] = list(trainer.strategy.device_mesh.shape)
    if trainer.is_global_zero:
        torch.save(recorder.record, Path(args.out) / f"{args.tag}.pt")
    trainer.strategy.barrier()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
