"""The Pile rows on a cluster: ``looped plan`` of every Pile recipe, as the table in docs/pile_fsdp.md.

Every row of Tables 3-4 and Figure 3 (and the middle-looped one) on 8 nodes × 8 H100 80GB at the
recipe's own batch (8 sequences of 1280 tokens per GPU, global 512) and precision: memory per rank
measured on one training step with activation checkpointing off and on, whether it fits, and the
days of the 400k steps at 40% MFU. Runs on a CPU (fake tensors; a few minutes per row).

    python benchmarks/plan_pile.py [--gpu h100] [--vocab-size 32768] [--mfu 0.4]

Prints a markdown table; the last line is the largest peak as a fraction of the usable memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from looped.tools.plan import GIB, duration, plan

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    "pile_1b_4x6.yaml",
    *sorted(p.relative_to(ROOT / "recipes").as_posix() for p in (ROOT / "recipes/pile").glob("[!_]*.yaml")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--vocab-size", default="32768", help="the tokenizer's (the data is not needed)")
    parser.add_argument("--mfu", default="0.4")
    parser.add_argument("--only", nargs="*", help="recipes under recipes/ (default: every Pile row)")
    args = parser.parse_args()
    flags = ["--nodes", "8", "--gpus-per-node", "8", "--gpu", args.gpu, "--vocab-size", args.vocab_size]
    print("| recipe | model | parameters | peak GiB, AC off | peak GiB, AC on | fits (off / on) | 400k steps |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for row in args.only or ROWS:
        result = plan([str(ROOT / "recipes" / row), *flags, "--mfu", args.mfu])
        by_flag = {s.activation_checkpointing: s for s in result.settings[:2]}
        off, on = by_flag[False], by_flag[True]
        verdict = " / ".join("yes" if s.fits else "**no**" for s in (off, on))
        print(
            f"| `{row}` | {result.model_shape} | {result.parameters / 1e6:,.0f}M | {off.memory.peak / GIB:.1f} "
            f"| {on.memory.peak / GIB:.1f} | {verdict} | {duration(result.days)} |",
            flush=True,
        )
        worst = max(worst, result.settings[0].memory.peak / result.usable_bytes)
    print(f"largest peak as written / usable memory ({result.usable_bytes / GIB:.1f} GiB): {worst:.2f}")


if __name__ == "__main__":
    sys.exit(main())
