"""Is our transformer as fast as the field's? Training tokens/s of ``LoopedTransformer`` (4⊗1) vs LitGPT's ``GPT``.

Both models have one shape: d=256, 4 layers, 4 heads, FFN 1024 (GELU MLP), pre-LayerNorm
without biases, RoPE on every head dimension, untied 50,304-token head (GPT-NeoX's padded
vocabulary, as the Pile recipes use); same batch, same AdamW, same loss. Steps of the two
are timed alternately (ABBA), round after round, in one process, so machine noise hits
both alike; the ratio of medians is the result (target >= 1.0). MFU is against the matmul
peak measured in the same run, with the FLOPs of ``LoopedTransformer.flops_per_token``
(identical for both shapes).

    pip install litgpt                 # only for this benchmark; not a project dependency
    python benchmarks/lm_throughput.py               # CPU, fp32
    python benchmarks/lm_throughput.py --device cuda --dtype bfloat16

The last line printed is the ratio.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from loop_overhead import interleaved_step_times, matmul_peak  # benchmarks/ is on sys.path when run as a script

from looped import LoopedConfig, LoopedTransformer


def litgpt_model(vocab_size: int, seq_len: int, d_model: int, layers: int, heads: int, d_ff: int):
    try:
        from litgpt.config import Config
        from litgpt.model import GPT
    except ImportError as err:
        raise SystemExit("this benchmark compares against LitGPT: `pip install litgpt`") from err
    config = Config(
        block_size=seq_len,
        vocab_size=vocab_size,
        padded_vocab_size=vocab_size,
        n_layer=layers,
        n_head=heads,
        n_query_groups=heads,
        n_embd=d_model,
        intermediate_size=d_ff,
        bias=False,
        norm_class_name="LayerNorm",
        mlp_class_name="GptNeoxMLP",
        gelu_approximate="none",
        rotary_percentage=1.0,
        parallel_residual=False,
        shared_attention_norm=False,
    )
    return GPT(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    d, layers, heads, d_ff = 256, 4, 4, 1024
    ours = LoopedTransformer(
        LoopedConfig(
            vocab_size=args.vocab,
            max_seq_len=args.seq_len,
            d_model=d,
            n_heads=heads,
            d_ff=d_ff,
            block_layers=layers,
            loops=1,
        )
    )
    models = {"looped (4⊗1)": ours, "litgpt GPT": litgpt_model(args.vocab, args.seq_len, d, layers, heads, d_ff)}
    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), device=args.device)
    tokens = args.batch * args.seq_len
    runs = interleaved_step_times(models, batch, args.rounds, 1, args.device, dtype)

    peak = matmul_peak(args.device, dtype)
    flops_per_token = 3 * ours.flops_per_token(args.seq_len)
    print(f"device {args.device}, {args.dtype}; batch {args.batch} x {args.seq_len} tokens; vocab {args.vocab}")
    print(f"measured matmul peak: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':<14} {'params':>11} {'tokens/s':>10} {'MFU':>7}")
    throughput = {}
    for name, times in runs.items():
        tps = tokens / statistics.median(times)
        throughput[name] = tps
        params = sum(p.numel() for p in models[name].parameters())
        print(f"{name:<14} {params:>11,} {tps:>10,.0f} {flops_per_token * tps / peak:>7.1%}")
    looped, litgpt = throughput.values()
    print(f"looped/litgpt tokens/s ratio (target >= 1.0): {looped / litgpt:.3f}")


if __name__ == "__main__":
    main()
