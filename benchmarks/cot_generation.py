"""Samples/s of the chain-of-thought task generators at the paper's sizes, on one core.

    OMP_NUM_THREADS=1 python benchmarks/cot_generation.py

Batches of 256 (a training step's worth), best of 5 rounds per setting; the last
line is the slowest setting's rate against the 5k samples/s target.
"""

import time

from looped.datamodules import EditDistance, LongestIncreasingSubsequence, ModularArithmetic

SETTINGS = [(ModularArithmetic, s) for s in (4, 5, 6)]
SETTINGS += [(LongestIncreasingSubsequence, s) for s in (50, 80, 100)]
SETTINGS += [(EditDistance, s) for s in (12, 16, 20)]
BATCH, TARGET = 256, 5000

rates = []
for cls, size in SETTINGS:
    for fmt in ("direct", "cot"):
        task = cls(size=size, format=fmt)
        best = float("inf")
        for index in range(5):
            start = time.perf_counter()
            task.generate(task.rng(0, 0, index), BATCH)
            best = min(best, time.perf_counter() - start)
        rates.append(BATCH / best)
        print(f"{cls.__name__:32s} size={size:<4d} {fmt:6s} {BATCH / best:10,.0f} samples/s")
print(f"slowest / target: {min(rates):,.0f} / {TARGET:,} = {min(rates) / TARGET:.2f}")
