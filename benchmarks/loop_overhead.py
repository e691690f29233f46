"""Does looping cost anything? Training tokens/s of ``(k⊗L)`` vs ``(kL⊗1)`` at equal FLOPs.

Both models do the same matmuls per token; the looped one reuses one block's
weights. Steps of the two are timed alternately, round after round, in one
process, so machine noise hits both alike; the ratio of medians is the result
(target ≥ 0.97). MFU is reported against this machine's fp32 matmul peak,
measured in the same run.

    python benchmarks/loop_overhead.py            # CPU, fp32
    python benchmarks/loop_overhead.py --device cuda --dtype bfloat16

The last line printed is the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from looped import LoopedConfig, LoopedTransformer


def matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Best observed FLOP/s of an n×n matmul: the roofline MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_steps(model, optimizer, batch: torch.Tensor, steps: int, device: str, dtype: torch.dtype) -> float:
    """Seconds for ``steps`` full training steps (forward, backward, optimiser)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def interleaved_step_times(
    models: dict, batch: torch.Tensor, rounds: int, steps: int, device: str, dtype: torch.dtype
) -> dict[str, list[float]]:
    """Seconds per training step of each model (AdamW), the models taking turns in ABBA order.

    Taking turns step by step, not model by model, is what makes the ratio repeatable on a
    shared machine: a burst of load from elsewhere hits both models alike.
    """
    runs = {}
    for name, model in models.items():
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        train_steps(model, optimizer, batch, 2, device, dtype)  # warm up allocator and kernels
        runs[name] = (model, optimizer, [])
    names = list(runs)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            model, optimizer, times = runs[name]
            times.append(train_steps(model, optimizer, batch, steps, device, dtype) / steps)
    return {name: times for name, (_, _, times) in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--block-layers", type=int, default=2, help="k")
    parser.add_argument("--loops", type=int, default=3, help="L")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=1, help="steps per model per round")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    shape = dict(vocab_size=512, max_seq_len=args.seq_len, d_model=args.d_model, n_heads=8, d_ff=4 * args.d_model)
    k, n = args.block_layers, args.loops
    models = {
        f"({k}⊗{n}) looped": LoopedTransformer(LoopedConfig(**shape, block_layers=k, loops=n)),
        f"({k * n}⊗1) deep": LoopedTransformer(LoopedConfig(**shape, block_layers=k * n, loops=1)),
    }
    batch = torch.randint(0, 512, (args.batch, args.seq_len + 1), device=args.device)
    tokens = args.batch * args.seq_len
    runs = interleaved_step_times(models, batch, args.rounds, args.steps, args.device, dtype)

    peak = matmul_peak(args.device, dtype)
    print(f"device {args.device}, {args.dtype}; batch {args.batch} x {args.seq_len} tokens; d_model {args.d_model}")
    print(f"measured matmul peak: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':<16} {'params':>9} {'tokens/s':>10} {'MFU':>7}")
    throughput = {}
    for name, times in runs.items():
        model = models[name]
        tps = tokens / statistics.median(times)
        flops = 3 * model.flops_per_token(args.seq_len) * tps
        throughput[name] = tps
        print(f"{name:<16} {model.num_parameters():>9,} {tps:>10,.0f} {flops / peak:>7.1%}")
    looped, deep = throughput.values()
    print(f"looped/deep tokens/s ratio (target >= 0.97): {looped / deep:.3f}")


if __name__ == "__main__":
    main()
