"""Longest (strictly) increasing subsequence (Feng et al. 2023).

The prompt is ``size`` numbers; the answer is the length of the longest strictly
increasing subsequence. The chain of thought writes the DP array
``dp[i] = 1 + max{dp[j] : j < i, a[j] < a[i]}`` (the LIS length ending at i)::

    direct:  93 85 97 86 <ans> 2 <eos>
    cot:     93 85 97 86 <sep> 1 1 2 2 <ans> 2 <eos>

Numbers are single tokens ``1 … size+value_range``: DP values lie in ``1 … size``
and sequence values in ``size+1 … size+value_range``, so the two never share a
token (as in the paper's code, whose 200/230/250-token vocabularies at sizes
50/80/100 leave 149 values each).

Sequences follow the paper's generator, so the answer spreads over ``3 … size``
instead of clustering near 2√size as for uniform sequences: 1–3 increasing runs
with ``t ~ U[3, size]`` elements in total are planted at random positions into a
uniform random background.
"""

from __future__ import annotations

import numpy as np

from looped.datamodules.cot import CoTTask, Parts
from looped.errors import InputError


class LongestIncreasingSubsequence(CoTTask):
    """LIS length of a sequence, directly or after writing the DP array.

    Args:
        size: sequence length (the paper: 50, 80, 100).
        value_range: how many distinct values a sequence draws from (the paper: 149).
        format: ``cot`` or ``direct`` (see ``looped.datamodules.cot``).
        **kwargs: ``max_seq_len``, batch sizes, eval set sizes, seed, workers.
    """

    def __init__(self, size: int = 80, value_range: int = 150, **kwargs) -> None:
        super().__init__(**kwargs)
        if size < 2:
            raise InputError(f"data.size (sequence length) must be >= 2, got {size}")
        if value_range < size:
            raise InputError(
                f"data.value_range={value_range} is smaller than data.size={size}: an increasing run as long as "
                "the sequence needs that many distinct values; raise data.value_range"
            )
        self.size, self.value_range = size, value_range
        self.task_tokens = ["<sep>"] + [str(v) for v in range(1, size + value_range + 1)]
        self.max_prompt_len = size
        self.max_cot_len = 1 + size  # <sep> dp[0] … dp[size-1]
        self._check_length()

    def number(self, v) -> np.ndarray:
        """Token id of the number ``v`` (1-based; id 3 is ``<sep>``)."""
        return 3 + np.asarray(v, dtype=np.int64)

    def _sequences(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Values in ``0 … value_range-1``, ``[n size]``, with planted increasing runs."""
        m, V = self.size, self.value_range
        seq = rng.integers(0, V, size=(n, m))
        low = min(3, m)
        total = rng.integers(low, m + 1, size=n)  # planted elements
        runs = rng.integers(1, 4, size=n)
        cuts = np.sort(rng.integers(1, np.maximum(total, 2)[:, None], size=(n, 2)), axis=1)
        cuts[runs < 3, 1] = total[runs < 3]
        cuts[runs < 2, 0] = total[runs < 2]
        k = np.arange(m)[None, :]
        planted = k < total[:, None]
        run = (k >= cuts[:, :1]).astype(np.int64) + (k >= cuts[:, 1:])
        values = np.argsort(rng.random((n, V)), axis=1)[:, :m]  # distinct values per sample
        key = np.where(planted, run * V + values, 4 * V)  # runs in order, each ascending
        values = np.sort(key, axis=1) % V
        places = np.sort(np.where(planted, np.argsort(rng.random((n, m)), axis=1), m), axis=1)
        rows = np.broadcast_to(np.arange(n)[:, None], (n, m))
        seq[rows[planted], places[planted]] = values[planted]
        return seq

    @staticmethod
    def dp(seq: np.ndarray) -> np.ndarray:
        """``dp[:, i]`` = length of the longest strictly increasing subsequence ending at ``i``, over the batch."""
        n, m = seq.shape
        dp = np.ones((n, m), dtype=np.int64)
        for i in range(1, m):
            smaller = seq[:, :i] < seq[:, i : i + 1]
            dp[:, i] = 1 + np.where(smaller, dp[:, :i], 0).max(axis=1)
        return dp

    def sample(self, rng: np.random.Generator, n: int) -> Parts:
        seq = self._sequences(rng, n)
        dp = self.dp(seq)
        prompt = self.number(self.size + 1 + seq)
        full = np.full(n, self.size, dtype=np.int64)
        if self.format == "cot":
            cot = np.concatenate([np.full((n, 1), self.token("<sep>")), self.number(dp)], axis=1)
        else:
            cot = np.zeros((n, 0), dtype=np.int64)
        return Parts(prompt, full, cot, full + 1, answer=self.number(dp.max(axis=1)))
