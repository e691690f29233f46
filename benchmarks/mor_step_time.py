"""Does a Mixture-of-Recursions router save training time? Training steps routed vs dense, side by side.

The routed model (``LoopedConfig.router``) runs each loop's block on the tokens its router keeps,
gathered into a shorter sequence, so at capacity c a loop should cost about c of the dense loop
(attention c², the router and the gather/scatter on top). Both models have the same shape; their
training steps (forward, backward, AdamW) take turns in ABBA order in one process
(``loop_overhead.interleaved_step_times``), so load from elsewhere hits both alike. Printed: each
model's median step, the FLOP count of each step (``LoopedTransformer.flops_per_token``) and,
last, the routed/dense ratio of median step times (target ≤ 0.75 at capacity ½ where the block
outweighs the head).

    python benchmarks/mor_step_time.py                     # CPU, fp32, expert-choice at capacity 0.5
    python benchmarks/mor_step_time.py --router token_choice
"""

from __future__ import annotations

import argparse
import statistics

import torch
from loop_overhead import interleaved_step_times

from looped import LoopedConfig, LoopedTransformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--block-layers", type=int, default=2)
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--capacity", type=float, default=0.5, help="expert-choice: every loop keeps this share")
    parser.add_argument("--router", default="expert_choice", choices=["expert_choice", "token_choice"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed turn")
    args = parser.parse_args()

    torch.manual_seed(0)
    shape = dict(
        vocab_size=args.vocab,
        max_seq_len=args.seq_len,
        d_model=args.d_model,
        n_heads=max(1, args.d_model // 64),
        d_ff=4 * args.d_model,
        block_layers=args.block_layers,
        loops=args.loops,
    )
    routing = dict(router=args.router, router_capacity=args.capacity if args.router == "expert_choice" else 1.0)
    models = {
        "dense": LoopedTransformer(LoopedConfig(**shape)),
        "routed": LoopedTransformer(LoopedConfig(**shape, **routing)),
    }
    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1))
    times = interleaved_step_times(models, batch, args.rounds, args.steps, "cpu", torch.float32)
    print(
        f"threads {torch.get_num_threads()}, batch {args.batch} x {args.seq_len}, d {args.d_model}, "
        f"({args.block_layers}⊗{args.loops}), vocab {args.vocab}, {args.router}"
        + (f" capacity {args.capacity}" if args.router == "expert_choice" else "")
    )
    print(f"{'model':<8} {'median step s':>14} {'train GFLOP':>12} {'tokens per loop':>18}")
    for name, model in models.items():
        flops = 3 * args.batch * args.seq_len * model.flops_per_token(args.seq_len)
        tokens = ",".join(str(m) for m in model.routed_tokens(args.seq_len))
        print(f"{name:<8} {statistics.median(times[name]):>14.4f} {flops / 1e9:>12.2f} {tokens:>18}")
    flop_ratio = models["routed"].flops_per_token(args.seq_len) / models["dense"].flops_per_token(args.seq_len)
    print(f"FLOP ratio routed / dense: {flop_ratio:.3f}")
    ratio = statistics.median(times["routed"]) / statistics.median(times["dense"])
    print(f"step time ratio routed / dense: {ratio:.3f}")


if __name__ == "__main__":
    main()
