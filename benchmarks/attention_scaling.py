"""How does one attention layer's training cost grow with sequence length, per mixer?

Forward + backward time of one mixer layer (Q/K/V/O projections, RoPE and the
mixing itself) on ``[1 T d]`` inputs, for every mixer registered in
``looped.model.mixers.MIXERS`` at run time (softmax through SDPA, linear, and any
other, e.g. sparse, once it is registered). Within each T the mixers are timed
alternately, round after round, so machine noise hits all alike; the table
shows medians in ms.

Softmax attention is O(T²) and linear attention O(T), so from T=512 to T=4096
(8×) linear should cost at most ~8-10× and softmax up to ~64×.

    python benchmarks/attention_scaling.py                     # CPU, ~1 minute
    python benchmarks/attention_scaling.py --plot scaling.png

The last line printed is the linear attention time ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import looped  # noqa: F401  (imports every mixer module, which registers itself)
from looped.model.mixers import MIXERS, RotaryEmbedding, build_mixer


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_step(mixer: torch.nn.Module, x: torch.Tensor, rope: RotaryEmbedding, device: str) -> float:
    """Seconds for one forward + backward of ``mixer`` on ``x``."""
    sync(device)
    start = time.perf_counter()
    mixer(x, rope).sum().backward()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per T (after one warm-up)")
    parser.add_argument("--plot", default=None, help="save a log-log plot of time vs T to this PNG")
    args = parser.parse_args()
    torch.manual_seed(0)

    names = sorted(MIXERS, key=lambda n: (n != "softmax", n != "linear", n))
    mixers = {}
    for name in names:
        try:
            mixers[name] = build_mixer(name, args.d_model, args.n_heads, 0.0, False).to(args.device)
        except ValueError as err:  # a mixer that needs options it has no default for
            print(f"skipping {name}: {err}")
    rope = RotaryEmbedding(args.d_model // args.n_heads, max(args.seq_lens)).to(args.device)
    print(
        f"device={args.device} threads={torch.get_num_threads()} d_model={args.d_model} "
        f"n_heads={args.n_heads} batch={args.batch}; fwd+bwd of one mixer layer, median of {args.repeats}"
    )

    ms: dict[str, dict[int, float]] = {name: {} for name in mixers}
    for t in args.seq_lens:
        x = torch.randn(args.batch, t, args.d_model, device=args.device, requires_grad=True)
        times: dict[str, list[float]] = {name: [] for name in mixers}
        for round_ in range(args.repeats + 1):
            for name, mixer in mixers.items():
                seconds = time_step(mixer, x, rope, args.device)
                if round_ > 0:  # the first round warms up caches and allocators
                    times[name].append(seconds)
            x.grad = None
            for mixer in mixers.values():
                mixer.zero_grad(set_to_none=True)
        for name in mixers:
            ms[name][t] = 1000 * statistics.median(times[name])

    width = max(len(n) for n in mixers) + 2
    print(f"{'ms':<{width}}" + "".join(f"{f'T={t}':>11}" for t in args.seq_lens))
    for name in mixers:
        print(f"{name:<{width}}" + "".join(f"{ms[name][t]:>11.2f}" for t in args.seq_lens))

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        for name in mixers:
            ax.plot(args.seq_lens, [ms[name][t] for t in args.seq_lens], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("fwd+bwd time per layer (ms)")
        ax.set_title(f"attention scaling ({args.device}, d={args.d_model}, h={args.n_heads})")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot saved to {args.plot}")

    lo, hi = min(args.seq_lens), max(args.seq_lens)
    ratio = {name: ms[name][hi] / ms[name][lo] for name in mixers}
    softmax = f"{ratio['softmax']:.1f}" if "softmax" in ratio else "n/a"
    linear = f"{ratio['linear']:.1f}" if "linear" in ratio else "n/a"
    print(f"linear {hi}/{lo} time ratio: {linear} (target <= 10); softmax: {softmax}")


if __name__ == "__main__":
    main()
