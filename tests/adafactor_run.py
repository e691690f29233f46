"""``looped.training.optim.Adafactor`` on FSDP2-sharded parameters vs. stock Adafactor on an unsharded copy.

    python tests/adafactor_run.py OUT --world-size 2

Spawns ``world-size`` CPU processes over gloo. Every rank shards one set of parameters with
``fully_shard`` (on a 1-D mesh, and again on a 2-D HSDP mesh) and keeps an unsharded copy
stepped by ``torch.optim.Adafactor``; both get the same gradients (drawn from a per-step seed,
the sharded side receives its shards). Rank 0 writes ``OUT/adafactor.pt``: per mesh, the
gathered parameters and optimiser state of both sides after every step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

# 2-D (one with rows that do not split evenly over 2 ranks), 3-D (factored over its last two
# dimensions) and 1-D parameters, as in a transformer's linears, norms and biases.
SHAPES = {"wide": (8, 6), "uneven": (5, 3), "stacked": (3, 4, 6), "norm": (7,), "bias": (4,)}
DECAYED = ("wide", "uneven", "stacked")
STEPS = 5


class Params(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weights = nn.ParameterDict(
            {n: nn.Parameter(torch.randn(s, generator=generator)) for n, s in SHAPES.items()}
        )


def groups(params: dict[str, nn.Parameter]) -> list[dict]:
    """LoopedLM-style groups: weight decay on matrices only."""
    return [
        {"params": [params[n] for n in DECAYED], "weight_decay": 0.1},
        {"params": [p for n, p in params.items() if n not in DECAYED], "weight_decay": 0.0},
    ]


def gradients(step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    # Different scales per step exercise the update clipping (d) and the relative step size.
    return {n: torch.randn(s, generator=generator) * (0.1 + step) for n, s in SHAPES.items()}


def compare(mesh) -> list[dict]:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    from looped.training.optim import Adafactor

    reference, sharded = Params(), Params()
    fully_shard(sharded, mesh=mesh)
    extra_ref, extra = nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(3, 2))  # an unsharded parameter too
    ref_params = {**dict(reference.weights.items()), "extra": extra_ref}
    params = {**dict(sharded.weights.items()), "extra": extra}
    assert all(isinstance(p, DTensor) for p in sharded.parameters()) and not isinstance(extra, DTensor)
    stock = torch.optim.Adafactor(groups(ref_params), lr=0.01)
    ours = Adafactor(groups(params), lr=0.01)
    records = []
    for step in range(STEPS):
        grads = {**gradients(step), "extra": torch.full((3, 2), 0.5 + step)}
        for name, p in params.items():
            ref_params[name].grad = grads[name].clone()
            p.grad = (
                distribute_tensor(grads[name], p.device_mesh, p.placements)
                if isinstance(p, DTensor)
                else grads[name].clone()
            )
        for optimizer in (stock, ours):  # a schedule changes lr between steps
            for group in optimizer.param_groups:
                group["lr"] = 0.01 / (1 + step)
        stock.step()
        ours.step()
        whole = lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()  # noqa: E731
        records.append(
            {
                "params": {n: (whole(p), ref_params[n].detach().clone()) for n, p in params.items()},
                "state": {
                    n: {k: (whole(v), stock.state[ref_params[n]][k].clone()) for k, v in ours.state[p].items()}
                    for n, p in params.items()
                },
            }
        )
    return records


def worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = {
            "fsdp": compare(init_device_mesh("cpu", (world_size,))),
            "hsdp": compare(init_device_mesh("cpu", (1, world_size), mesh_dim_names=("replicate", "shard"))),
        }
        if rank == 0:
            torch.save(result, Path(out) / "adafactor.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args.world_size, os.path.join(tmp, "rendezvous"), args.out), nprocs=args.world_size)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
