"""Before a cluster job: what this project has never measured on a GPU, in one command (≤ 8 min on one H100/H200).

1. The sparse mixer's FlexAttention kernel (block-sparse, local window 64) against masked SDPA on the
   same inputs: largest difference of the output and of the three input gradients (bf16), and the
   forward + backward time of SDPA over FlexAttention at T=4096 (medians, taking turns).
2. The 1B ``(4⊗6)`` model of ``recipes/pile_1b_4x6.yaml`` (its batch of 8 × 1280, bf16-mixed, FSDP2
   over one rank as ``looped.training.parallel.parallelize`` wraps it, its Adafactor and clipping): tokens/s
   and MFU over 20 steps, with and without ``compile``; MFU against the GPU's dense bf16 peak
   (``looped.tools.plan.GPUS``) with the FLOPs ThroughputMonitor counts.
3. The peak memory ``looped plan`` predicts for that run (one step on fake tensors, on the CPU)
   against ``torch.cuda.max_memory_allocated`` of the eager run.
4. The loop overhead at d=2048: training tokens/s of ``(4⊗6)`` over ``(24⊗1)`` at equal FLOPs
   (``benchmarks/loop_overhead.py``'s interleaved timing).

    python benchmarks/gpu_check.py              # on one GPU
    python benchmarks/gpu_check.py --dry-run    # on the CPU at toy size: every code path, no numbers to keep

Prints one table; the last line is the (4⊗6)/(24⊗1) tokens/s ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from loop_overhead import interleaved_step_times  # benchmarks/ is on sys.path when run as a script

from looped import LoopedConfig, LoopedTransformer
from looped.model.mixers.sparse import block_mask, dense_mask, flex_attention
from looped.tools.memory import Job, measure_step, optimizer_step
from looped.tools.plan import GIB, GPUS
from looped.tools.resolve import resolve
from looped.training.parallel import materialize, mixed_precision_policy, parallelize

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "pile_1b_4x6.yaml")


@dataclass
class Size:
    """What runs: the real sizes on a GPU, toy ones for --dry-run on the CPU."""

    device: str
    seq_len: int  # attention benchmark length
    heads: int
    overrides: list[str]  # shrink the recipe (none on a GPU)
    steps: int
    warmup: int


GPU_SIZE = Size("cuda", 4096, 32, [], steps=20, warmup=3)
TOY = Size(
    "cpu",
    256,
    2,
    [
        *("--model.init_args.config.d_model", "64", "--model.init_args.config.n_heads", "2"),
        *("--model.init_args.config.d_ff", "128", "--data.seq_len", "64", "--data.batch_size", "2"),
    ],
    steps=2,
    warmup=1,
)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def flex_against_sdpa(size: Size) -> dict[str, str]:
    """Max |difference| of outputs and gradients, and SDPA time / FlexAttention time, forward + backward."""
    d_head, t, device = 64, size.seq_len, size.device
    dtype = torch.bfloat16
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, size.heads, t, d_head, device=device, dtype=dtype) for _ in range(3))
    mask, blocks = dense_mask("local", 64, 64, t, q.device), block_mask("local", 64, 64, t, q.device)
    # FlexAttention has no backward on the CPU: the dry run checks its forward only.
    grad = device == "cuda"

    def run(attend):
        inputs = [x.detach().requires_grad_(grad) for x in (q, k, v)]
        out = attend(*inputs)
        if grad:
            out.float().square().sum().backward()
        return [out, *(x.grad for x in inputs if grad)]

    flex = run(lambda a, b, c: flex_attention(a, b, c, blocks))
    sdpa = run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask))
    diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(flex, sdpa))
    times = {"flex": [], "sdpa": []}
    for _ in range(5):  # taking turns, so load on the machine hits both alike
        times["flex"].append(timed(lambda: run(lambda a, b, c: flex_attention(a, b, c, blocks)), device))
        times["sdpa"].append(timed(lambda: run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, mask)), device))
    ratio = statistics.median(times["sdpa"]) / statistics.median(times["flex"])
    what = "forward + backward" if grad else "forward only (no CPU backward)"
    return {
        f"sparse mixer: FlexAttention vs masked SDPA, max |diff| ({what})": f"{diff:.2e}",
        f"sparse mixer: SDPA time / FlexAttention time, T={t}": f"{ratio:.2f}x",
    }


def gpu_named(name: str):
    """The entry of ``GPUS`` whose every part (``h100``, ``pcie``) is in the device's name; the most specific."""
    found = [(key, g) for key, g in GPUS.items() if all(part in name.lower() for part in key.split("-"))]
    return max(found, key=lambda kv: len(kv[0].split("-")))[1] if found else None


def train_1b(size: Size, compile: bool, gpu_peak: float | None) -> dict:
    """Tokens/s, MFU and peak memory of the recipe's 1B model on one rank, as Lightning would train it."""
    cli = resolve(RECIPE, size.overrides, 32768)
    module, trainer = cli.model, cli.config.trainer
    config = module.config
    job = Job(
        mesh_shape=(1, 1),
        precision="bf16-mixed",
        batch_size=cli.batch_size,
        seq_len=config.max_seq_len,
        gradient_clip_val=trainer.gradient_clip_val,
        activation_checkpointing=module.activation_checkpointing,
    )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(size.device, (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    parallelize(module.model, mesh, job.activation_checkpointing, compile, mixed_precision_policy(job.precision))
    materialize(module.model, torch.device(size.device))
    optimizer = module.optimizer_factory(module.parameter_groups())
    shape = (job.batch_size, job.seq_len)
    ids = torch.randint(0, config.vocab_size, shape, device=size.device)
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}
    if size.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(size.warmup):  # compilation, allocator, Adafactor's state
        optimizer_step(module, optimizer, batch, job)
    seconds = timed(lambda: [optimizer_step(module, optimizer, batch, job) for _ in range(size.steps)], size.device)
    tokens_per_second = size.steps * batch["input_ids"].numel() / seconds
    flops = 3 * module.model.flops_per_token(job.seq_len) * tokens_per_second
    measured = torch.cuda.max_memory_allocated() if size.device == "cuda" else None
    mfu = flops / gpu_peak if gpu_peak else None
    return {"tokens/s": tokens_per_second, "mfu": mfu, "peak": measured, "job": job, "cli": cli}


def loop_overhead(size: Size, d: int) -> float:
    """(4⊗6) tokens/s over (24⊗1) at width ``d``."""
    shape = dict(vocab_size=32768, max_seq_len=1024, d_model=d, n_heads=max(2, d // 64), d_ff=d * 5 // 2)
    models = {
        "looped": LoopedTransformer(LoopedConfig(**shape, block_layers=4, loops=6, norm="rmsnorm")),
        "deep": LoopedTransformer(LoopedConfig(**shape, block_layers=24, loops=1, norm="rmsnorm")),
    }
    seq = 1024 if size.device == "cuda" else 64
    batch = torch.randint(0, 32768, (4, seq + 1), device=size.device)
    times = interleaved_step_times(
        models, batch, rounds=10 if size.device == "cuda" else 2, steps=1, device=size.device, dtype=torch.bfloat16
    )
    return statistics.median(times["deep"]) / statistics.median(times["looped"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks every code path")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no GPU visible; run it on the GPU machine, or --dry-run here")
    size = TOY if args.dry_run else GPU_SIZE
    name = torch.cuda.get_device_name() if size.device == "cuda" else "CPU (dry run)"
    # The dry run computes an MFU against the H100's peak only to exercise the arithmetic.
    gpu = gpu_named(name) if size.device == "cuda" else GPUS["h100"]
    peak = gpu.bf16_tflops * 1e12 if gpu else None
    rows = {"device": name, "bf16 dense peak for MFU": f"{gpu.bf16_tflops:,.0f} TFLOP/s ({gpu.name})" if gpu else "?"}
    rows.update(flex_against_sdpa(size))
    dist.init_process_group("nccl" if size.device == "cuda" else "gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        for compile in (False, True):
            run = train_1b(size, compile, peak)
            label = f"(4⊗6) 1B, bf16-mixed, FSDP2 on one rank, {'compiled' if compile else 'eager'}"
            rows[f"{label}: tokens/s"] = f"{run['tokens/s']:,.0f}"
            rows[f"{label}: MFU"] = f"{run['mfu']:.1%}" if run["mfu"] else "(GPU not in looped.tools.plan.GPUS)"
            if not compile:
                eager = run
    finally:
        dist.destroy_process_group()
    planned = measure_step(lambda: eager["cli"].instantiate().model, eager["job"]).peak
    measured = eager["peak"]
    rows["peak memory, looped plan (fake tensors)"] = f"{planned / GIB:.2f} GiB"
    rows["peak memory, torch.cuda.max_memory_allocated (eager)"] = (
        f"{measured / GIB:.2f} GiB (plan / measured {planned / measured:.3f})" if measured else "(CPU: not measured)"
    )
    d = 2048 if size.device == "cuda" else 64  # the recipe's width; a toy one in a dry run
    ratio = loop_overhead(size, d)
    rows[f"loop overhead: (4⊗6) tokens/s / (24⊗1) tokens/s, d={d}"] = f"{ratio:.3f}"
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    print(f"(4⊗6)/(24⊗1) tokens/s ratio at equal FLOPs (target >= 0.97): {ratio:.3f}")


if __name__ == "__main__":
    main()
