"""n-ary addition (Saunshi et al. 2025, Table 1): the sum of n zero-padded 3-digit numbers, no chain of thought.

A sample is the text ``315+120+045+824=01304``: n operands of ``digits`` digits
(zero-padded, uniform in ``0 … 10^digits − 1``) joined by ``+``, then ``=``, then
the sum written most significant digit first in a fixed field of ``W`` digits,
zero-padded, where ``W`` is the number of digits of the largest possible sum
(32 × 999 = 31968: ``W = 5``). The model reads ``… =`` and predicts the W answer
digits one after the other (teacher forcing); a sample counts as solved only if
all W are right (``exact_match``), so the leading zeros are scored too.

Every sample, whatever its n, is left-padded with ``_`` to one length
(``seq_len``), so the answer always sits at the last W positions and a batch
mixing n = 2 and n = 32 is one tensor:

    tokens   0-9 → 0-9, ``+`` → 10, ``=`` → 11, ``_`` (padding) → 12
    input    _ _ … _ 3 1 5 + 1 2 0 + 0 4 5 + 8 2 4 = 0 1 3 0
    labels   -100 …                            -100 0 1 3 0 4   (the last W positions)

``input_ids`` is the text without its last digit and ``labels[t]`` is the token
after position t, so the label at ``=`` is the first answer digit.

Training draws n uniformly from ``train_operands`` for each sample (the paper:
{2, 4, 8, 16, 32}); evaluation has one named set per n of ``eval_operands``
(``n8``, ``n16``, ``n24``, ``n32``), so n = 24 tests sizes never trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from looped.contract import IGNORE
from looped.datamodules.base import SyntheticTask
from looped.errors import InputError

PLUS, EQUALS, PAD = 10, 11, 12


class NaryAddition(SyntheticTask):
    """Add n zero-padded numbers; the answer is the sum's digits in a fixed-width field (see module doc).

    Args:
        digits: digits per operand (the paper: 3, operands 0..999).
        train_operands: the n of the training mix, each drawn with equal probability per sample.
        eval_operands: one validation and one test set per n, named ``n{n}``; empty: a single
            set drawn from the training mix.
        pad_to: length of every sample; default (None) the shortest that fits the largest n.
            Set it to keep one length across recipes with different n.
        **kwargs: batch sizes, eval set sizes (per n), seed, workers (see ``SyntheticTask``).
    """

    def __init__(
        self,
        digits: int = 3,
        train_operands: Sequence[int] = (2, 4, 8, 16, 32),
        eval_operands: Sequence[int] = (8, 16, 24, 32),
        pad_to: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not 1 <= digits <= 9:
            raise InputError(f"data.digits must lie in 1..9 (the paper: 3), got {digits}")
        for field, values in (("train_operands", train_operands), ("eval_operands", eval_operands)):
            bad = [n for n in values if not isinstance(n, int) or n < 2]
            if bad:
                raise InputError(f"data.{field} must hold operand counts n >= 2 (a sum needs two terms), got {bad}")
            if len(set(values)) != len(values):
                raise InputError(f"data.{field} lists an operand count twice: {list(values)}")
        if not train_operands:
            raise InputError("data.train_operands is empty; give the n to train on, e.g. [2, 4, 8, 16, 32]")
        self.digits = digits
        self.train_operands = list(train_operands)
        self.eval_operands = list(eval_operands)
        self.eval_names = [f"n{n}" for n in self.eval_operands]
        self.max_operands = max(self.train_operands + self.eval_operands)
        self.answer_digits = len(str(self.max_operands * (10**digits - 1)))
        # n operands of d digits, n-1 '+', '=', and the answer without its last digit.
        needed = self.max_operands * (digits + 1) + self.answer_digits - 1
        if pad_to is not None and pad_to < needed:
            raise InputError(
                f"data.pad_to={pad_to} is too short: {self.max_operands} operands of {digits} digits and a "
                f"{self.answer_digits}-digit answer need {needed} tokens; raise data.pad_to or leave it unset"
            )
        self.pad_to = pad_to or needed
        self._needed = needed

    @property
    def vocab(self) -> list[str]:
        return [str(i) for i in range(10)] + ["+", "=", "_"]

    @property
    def seq_len(self) -> int:
        return self.pad_to

    def decode(self, ids) -> str:
        """Readable text without padding, e.g. ``315+120+045+824=0130`` (labels: ``01304``)."""
        return super().decode(ids).replace("_", "")

    def describe(self) -> str:
        example, labels = self.generate(np.random.default_rng(0), 1)
        return (
            f"{super().describe()}\n  answer: {self.answer_digits} digits, most significant first, zero-padded; "
            f"train n ∈ {self.train_operands}, eval sets {self.eval_names}\n"
            f"  e.g. input {self.decode(example[0])}, labels {self.decode(labels[0])}"
        )

    # -- generation ------------------------------------------------------------------
    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        counts = rng.choice(np.asarray(self.train_operands, dtype=np.int64), size=n)
        return self._samples(rng, counts)

    def generate_eval(self, name: str, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.eval_names:
            raise KeyError(f"NaryAddition has no evaluation set {name!r}; data.eval_operands gives {self.eval_names}")
        return self._samples(rng, np.full(n, self.eval_operands[self.eval_names.index(name)], dtype=np.int64))

    def _samples(self, rng: np.random.Generator, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Samples with ``counts[i]`` operands each, laid out right-aligned in ``max_operands`` slots."""
        b, slots, d, w = len(counts), self.max_operands, self.digits, self.answer_digits
        used = np.arange(slots) >= slots - counts[:, None]  # [b slots]: the last counts[i] slots
        operands = np.where(used, rng.integers(0, 10**d, size=(b, slots), dtype=np.int64), 0)
        total = operands.sum(axis=1)
        # Slot s holds operand s's digits and the sign after it: '+', or '=' after the last operand.
        tokens = np.empty((b, slots, d + 1), dtype=np.int64)
        tokens[:, :, :d] = operands[:, :, None] // 10 ** np.arange(d - 1, -1, -1) % 10
        tokens[:, :, d] = PLUS
        tokens[:, -1, d] = EQUALS
        tokens[~used] = PAD
        answer = total[:, None] // 10 ** np.arange(w - 1, -1, -1) % 10  # [b w]
        left_pad = np.full((b, self.pad_to - self._needed), PAD, dtype=np.int64)
        text = np.concatenate([left_pad, tokens.reshape(b, -1), answer], axis=1)
        input_ids = text[:, :-1]
        labels = np.full_like(input_ids, IGNORE)
        labels[:, -w:] = answer  # labels[t] = text[t + 1]: from '=' on, the next answer digit
        return np.ascontiguousarray(input_ids), labels
