"""What does reading every loop cost? Per-loop evaluation from one forward vs one plain forward.

Three ways to evaluate a ``(k⊗L)`` model at inference, timed alternately,
round after round, in one process (medians), so machine noise hits all alike
(the slow naive way only every other round, to keep the run under two minutes):

* (a) ``plain``: one forward ``model(x)`` — the accuracy at L only;
* (b) ``per-loop``: one forward with ``return_loop_states=True`` and a readout of
  the labelled positions after every loop (``per_loop_predictions``, what
  ``PerLoopAccuracy`` reads) — the accuracy at every n = 1..L;
* (c) ``naive``: L separate forwards with ``loops=1..L`` — the same numbers, L(L+1)/2 loops.

    python benchmarks/per_loop_eval.py

The last line printed is the ratio (b)/(a) (target ≤ 1.15).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from looped import LoopedConfig, LoopedTransformer
from looped.contract import IGNORE
from looped.evaluation.loop_readout import per_loop_predictions


def plain(model, input_ids, labels, loops):
    return model(input_ids).argmax(-1)


def per_loop(model, input_ids, labels, loops):
    return per_loop_predictions(model, input_ids, labels, loops).correct


def naive(model, input_ids, labels, loops):
    mask = labels != IGNORE
    return [((model(input_ids, loops=n).argmax(-1) == labels) | ~mask).all(dim=1) for n in range(1, loops + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--block-layers", type=int, default=2, help="k")
    parser.add_argument("--loops", type=int, default=6, help="L")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--answers", type=int, default=4, help="labelled positions per sequence")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)

    config = LoopedConfig(
        vocab_size=args.vocab,
        max_seq_len=args.seq_len,
        d_model=args.d_model,
        n_heads=8,
        d_ff=4 * args.d_model,
        block_layers=args.block_layers,
        loops=args.loops,
    )
    model = LoopedTransformer(config).eval()
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, -args.answers :] = torch.randint(0, args.vocab, (args.batch, args.answers))

    methods = {"(a) plain forward": plain, "(b) per-loop, one forward": per_loop, "(c) naive, L forwards": naive}
    times = {name: [] for name in methods}
    with torch.inference_mode():
        per_loop(model, input_ids, labels, args.loops)  # warm up allocator and kernels (the same for all three)
        for round_ in range(args.rounds):
            for name, fn in methods.items():
                if fn is naive and round_ % 2:
                    continue  # L times the cost and not the number this exists for: every other round
                start = time.perf_counter()
                fn(model, input_ids, labels, args.loops)
                times[name].append(time.perf_counter() - start)

    print(
        f"cpu, fp32, {torch.get_num_threads()} threads; ({args.block_layers}⊗{args.loops}), d_model {args.d_model}, "
        f"batch {args.batch} x {args.seq_len}, vocab {args.vocab}, {args.answers} labelled positions per sequence; "
        f"median of {args.rounds} rounds ({len(times['(c) naive, L forwards'])} for naive)"
    )
    print(f"{'method':<28} {'ms':>8} {'vs plain':>9}")
    base = statistics.median(times["(a) plain forward"])
    for name, t in times.items():
        print(f"{name:<28} {1e3 * statistics.median(t):>8.1f} {statistics.median(t) / base:>8.2f}x")
    ratio = statistics.median(times["(b) per-loop, one forward"]) / base
    print(f"per-loop / plain forward time ratio (target <= 1.15): {ratio:.3f}")


if __name__ == "__main__":
    main()
