"""Group composition (Saunshi et al. 2025, Theorem 5.1): compose n group elements.

A sample reads ``g_1 g_2 … g_n =`` and the label at ``=`` is the product
``g_1 · g_2 · … · g_n``, written left to right. For permutations the product is
function composition, ``(σ·τ)(i) = σ(τ(i))`` (τ is applied first), so the
product of a sequence is ``g_1(g_2(…g_n(i)…))``. For the cyclic group Z_m the
product is addition mod m (commutative, so the order does not matter).

Theorem 5.1: a 1-layer block looped ⌈log2 n⌉ times composes n elements of any
finite group by parallel prefix (pairs, then pairs of pairs, ...). S5 is the
smallest non-solvable group, for which a fixed-depth model is not expected to
suffice at growing n; Z_m is the solvable (abelian) control.

Tokens: one per group element plus ``=``. A permutation σ of ``{0..d-1}`` is
written as its one-line form ``σ(0) σ(1) … σ(d-1)`` without spaces (``01234`` is
the identity of S5); an element k of Z_m is written ``k``.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import numpy as np

from looped.datamodules.base import SyntheticTask, answer_at_end
from looped.errors import InputError

MAX_CYCLIC_ORDER = 100
MAX_SYMMETRIC_DEGREE = 6  # S6 has 720 elements; S7's 5040 tokens would dwarf the model's embedding


def group_elements(group: str, order: int) -> np.ndarray:
    """The elements as rows ``[G d]``: permutations in one-line form (lexicographic), or ``[[0], [1], …]`` for Z_m."""
    if group == "cyclic":
        return np.arange(order, dtype=np.int64)[:, None]
    return np.array(list(itertools.permutations(range(order))), dtype=np.int64)


def multiplication_table(group: str, order: int) -> np.ndarray:
    """``table[a, b]`` = index of ``element_a · element_b``; for permutations ``(σ·τ)(i) = σ(τ(i))``."""
    if group == "cyclic":
        a = np.arange(order)
        return (a[:, None] + a[None, :]) % order
    perms = group_elements(group, order)  # [G d]
    size, degree = perms.shape
    # composed[a, b, i] = perms[a, perms[b, i]]
    composed = perms[np.arange(size)[:, None, None], perms[None, :, :]]  # [G G d]
    # A permutation's index from its base-d code (at most 6^6 codes).
    weights = degree ** np.arange(degree - 1, -1, -1)
    index_of_code = np.full(degree**degree, -1, dtype=np.int64)
    index_of_code[perms @ weights] = np.arange(size)
    return index_of_code[composed @ weights]


def prefix_products(elements: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``out[:, i] = elements[:, 0] · … · elements[:, i]`` by one table lookup per position (vectorised over rows)."""
    out = np.empty_like(elements)
    out[:, 0] = elements[:, 0]
    for i in range(1, elements.shape[1]):
        out[:, i] = table[out[:, i - 1], elements[:, i]]
    return out


class GroupComposition(SyntheticTask):
    """Compose ``length`` uniformly random elements of Z_m or S_d; the answer follows ``=``.

    Args:
        group: ``cyclic`` (Z_m, addition mod m) or ``symmetric`` (S_d, permutations of d points).
        order: m for Z_m (2..100), or the degree d for S_d (2..6); the paper's non-solvable case is S5.
        length: n, the elements to compose (Theorem 5.1: ⌈log2 n⌉ loops of one layer suffice).
        supervise: ``last`` trains on the product at ``=`` only; ``all`` also labels each element
            g_i with the prefix product ``g_1 · … · g_i`` (n times the signal per sample).
            Validation and test always score the last position.
        **kwargs: batch sizes, eval set sizes, seed, workers (see ``SyntheticTask``).
    """

    def __init__(
        self,
        group: Literal["cyclic", "symmetric"] = "symmetric",
        order: int = 5,
        length: int = 16,
        supervise: Literal["last", "all"] = "last",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if group not in ("cyclic", "symmetric"):
            raise InputError(f"data.group must be 'cyclic' or 'symmetric', got {group!r}")
        if group == "cyclic" and not 2 <= order <= MAX_CYCLIC_ORDER:
            raise InputError(f"data.order must lie in 2..{MAX_CYCLIC_ORDER} for the cyclic group Z_m, got {order}")
        if group == "symmetric" and not 2 <= order <= MAX_SYMMETRIC_DEGREE:
            size = f" (S{order} has {math.factorial(order)} elements, one token each)" if order > 1 else ""
            raise InputError(
                f"data.order must lie in 2..{MAX_SYMMETRIC_DEGREE} for the symmetric group S_d, got {order}{size}: "
                f"the vocabulary is one token per element, so S7 (5040 tokens) and above would be mostly embedding "
                f"table. S5 (120 elements) is the paper's non-solvable case."
            )
        if length < 2:
            raise InputError(f"data.length must be >= 2 (elements to compose), got {length}")
        self.group, self.order, self.length, self.supervise = group, order, length, supervise
        self._elements = group_elements(group, order)
        self._table = multiplication_table(group, order)
        # Built once: decode looks a token up per position.
        self._vocab = ["".join(map(str, g)) for g in self._elements.tolist()] + ["="]
        # Distinct inputs must comfortably exceed the eval sets, or drawing them disjointly stalls.
        distinct = len(self._elements) ** length
        if distinct < 2 * (self.val_size + self.test_size):
            raise InputError(
                f"data.length={length} gives only {distinct} distinct sequences of {self.group_name}, too few for "
                f"data.val_size + data.test_size = {self.val_size + self.test_size} disjoint evaluation samples; "
                "raise data.length or lower the eval sizes"
            )

    @property
    def group_name(self) -> str:
        return f"Z_{self.order}" if self.group == "cyclic" else f"S{self.order}"

    @property
    def group_size(self) -> int:
        return len(self._elements)

    @property
    def vocab(self) -> list[str]:
        return self._vocab

    @property
    def seq_len(self) -> int:
        return self.length + 1

    def decode(self, ids) -> str:
        """Readable text, tokens separated by spaces: ``01234 10234 … =``."""
        return " ".join(self.vocab[i] for i in np.asarray(ids).tolist() if 0 <= i < self.vocab_size)

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        elements = rng.integers(0, self.group_size, size=(n, self.length), dtype=np.int64)
        answer = prefix_products(elements, self._table)[:, -1]
        return answer_at_end(elements, answer, separator=self.group_size)

    def labels_at_every_position(self, input_ids: np.ndarray) -> np.ndarray:
        """Label element g_i with ``g_1 · … · g_i`` and ``=`` with the whole product."""
        prefix = prefix_products(input_ids[:, :-1], self._table)
        return np.concatenate([prefix, prefix[:, -1:]], axis=1)
