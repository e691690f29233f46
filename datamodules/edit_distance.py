"""Edit distance with insertion/deletion cost 2 and substitution cost 3 (Feng et al. 2023).

The prompt is two strings of ``size`` letters separated by ``|``; the answer is
their weighted edit distance. The chain of thought writes the DP table
``D[i][j]`` (distance between the first i letters of the first string and the
first j of the second) row by row, ``i = 1 … size``, each row ``D[i][1 … size]``,
rows separated by ``,``; the answer is the final cell::

    direct:  c a b | a b b <ans> 5 <eos>
    cot:     c a b | a b b <sep> 3 5 7 , 3 6 5 , 5 3 5 <ans> 5 <eos>

Numbers ``0 … 3·size`` are single tokens (every cell is at most 3·size).

Strings follow the paper's generator: each pair uses 3–10 letters drawn from the
alphabet; in 40% of pairs the second string is independent of the first, in the
rest it is the first with ``k ~ U[1, size]`` random edits (a substitution, or a
deletion and an insertion elsewhere), so distances spread from small to large.
Both strings have exactly ``size`` letters (the paper's second string varies by
up to ±3; equal lengths keep the table square and every row the same length).
"""

from __future__ import annotations

import string

import numpy as np

from looped.datamodules.cot import CoTTask, Parts
from looped.errors import InputError

INSERT_DELETE, SUBSTITUTE = 2, 3


class EditDistance(CoTTask):
    """Weighted edit distance of two strings, directly or after writing the DP table.

    Args:
        size: letters per string (the paper: 12, 16, 20).
        alphabet_size: letters ``a …`` available (at most 26); each pair uses 3–10 of them.
        format: ``cot`` or ``direct`` (see ``looped.datamodules.cot``).
        **kwargs: ``max_seq_len``, batch sizes, eval set sizes, seed, workers.
    """

    def __init__(self, size: int = 16, alphabet_size: int = 26, **kwargs) -> None:
        super().__init__(**kwargs)
        if size < 1:
            raise InputError(f"data.size (string length) must be >= 1, got {size}")
        if not 2 <= alphabet_size <= 26:
            raise InputError(f"data.alphabet_size must be in 2 … 26 (letters a-z), got {alphabet_size}")
        self.size, self.alphabet_size = size, alphabet_size
        self.letters = list(string.ascii_lowercase[:alphabet_size])
        self.task_tokens = self.letters + ["|", "<sep>", ","] + [str(v) for v in range(SUBSTITUTE * size + 1)]
        self.max_prompt_len = 2 * size + 1
        self.max_cot_len = 1 + size * size + (size - 1)  # <sep>, the table, a "," between rows
        self._check_length()

    def number(self, v) -> np.ndarray:
        """Token id of the number ``v``."""
        return 3 + self.alphabet_size + 3 + np.asarray(v, dtype=np.int64)

    def _strings(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Two ``[n size]`` arrays of letter indices."""
        m, A = self.size, self.alphabet_size
        used = rng.integers(min(3, A), min(10, A) + 1, size=n)  # letters in this pair
        subset = np.argsort(rng.random((n, A)), axis=1)

        def letters(shape) -> np.ndarray:  # uniform over each row's subset
            pick = (rng.random(shape) * used.reshape(-1, *[1] * (len(shape) - 1))).astype(np.int64)
            return np.take_along_axis(subset, pick.reshape(n, -1), axis=1).reshape(shape)

        first = letters((n, m))
        second = first.copy()
        edits = rng.integers(1, m + 1, size=n)
        kind, p, q = rng.integers(0, 2, size=(n, m)), rng.integers(0, m, size=(n, m)), rng.integers(0, m, size=(n, m))
        new, cols = letters((n, m)), np.arange(m)[None, :]
        for e in range(m):
            active = edits > e
            sub = active & (kind[:, e] == 0)
            second[sub, p[sub, e]] = new[sub, e]
            # Delete position p, then insert the new letter at q of the shortened string.
            pe, qe = p[:, e : e + 1], q[:, e : e + 1]
            shortened = np.where(cols < qe, cols, cols - 1)  # index into the string without position p
            source = np.where(shortened < pe, shortened, shortened + 1)
            shifted = np.where(
                cols == qe, new[:, e : e + 1], np.take_along_axis(second, np.clip(source, 0, m - 1), axis=1)
            )
            move = active & (kind[:, e] == 1)
            second[move] = shifted[move]
        independent = rng.random(n) < 0.4
        second[independent] = letters((n, m))[independent]
        return first, second

    @staticmethod
    def table(first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """``D[:, i, j]`` for ``i, j = 0 … size`` over the batch (the textbook recurrence, one cell per step)."""
        n, m = first.shape
        D = np.zeros((n, m + 1, m + 1), dtype=np.int64)
        D[:, :, 0] = INSERT_DELETE * np.arange(m + 1)
        D[:, 0, :] = INSERT_DELETE * np.arange(m + 1)
        for i in range(1, m + 1):
            substitute = SUBSTITUTE * (first[:, i - 1 : i] != second)  # [n m] cost of pairing letter i with j
            for j in range(1, m + 1):
                D[:, i, j] = np.minimum(
                    np.minimum(D[:, i - 1, j], D[:, i, j - 1]) + INSERT_DELETE,
                    D[:, i - 1, j - 1] + substitute[:, j - 1],
                )
        return D

    def sample(self, rng: np.random.Generator, n: int) -> Parts:
        first, second = self._strings(rng, n)
        D = self.table(first, second)
        m = self.size
        bar = np.full((n, 1), self.token("|"))
        prompt = np.concatenate([3 + first, bar, 3 + second], axis=1)
        if self.format == "cot":
            cells = self.number(D[:, 1:, 1:])  # [n m m]
            commas = np.full((n, m, 1), self.token(","))
            rows = np.concatenate([cells, commas], axis=2).reshape(n, m * (m + 1))[:, :-1]  # no "," after the last
            cot = np.concatenate([np.full((n, 1), self.token("<sep>")), rows], axis=1)
        else:
            cot = np.zeros((n, 0), dtype=np.int64)
        full = np.full(n, m, dtype=np.int64)
        return Parts(prompt, 2 * full + 1, cot, np.full(n, self.max_cot_len, dtype=np.int64), self.number(D[:, m, m]))
