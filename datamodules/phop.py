"""p-hop induction (Sanford, Hsu & Telgarsky 2024; Table 1 of Saunshi et al. 2025).

For a sequence ``v_1 … v_n`` (1-indexed),
``find_1(v, i) = max({0} ∪ {j ≤ i : v_{j-1} = v_i})`` jumps to the position just
after the previous occurrence of ``v_i``; ``find_p = find_1 ∘ find_{p-1}``; the
answer is ``v[find_p(v, n)]``. Only sequences whose p-hop chain exists
(``find_p(v, n) > 0``) are kept, as in the paper.

A sample reads ``v_1 … v_n =`` and the label at ``=`` is the answer letter.

With ``train_hops`` (a list of hop counts) every training sample draws its own p from the list and
the query token says which: ``v_1 … v_n =p``. A model trained so answers any of those depths, and
each evaluation set (``eval_hops``: ``hops1``, ``hops2``, …) holds samples of one known depth — what
asking "does an exit rule spend more loops on deeper problems?" needs.
"""

from __future__ import annotations

import string
from typing import Literal

import numpy as np

from looped.contract import IGNORE
from looped.datamodules.base import SyntheticTask, answer_at_end, draw_kept
from looped.errors import InputError


def hop_table(seqs: np.ndarray, alphabet_size: int) -> np.ndarray:
    """``find_1`` for every position, vectorised: ``table[b, i] = find_1(v_b, i)`` for i in 0..n.

    Column 0 is the sink ``find_1(v, 0) = 0``.
    """
    b, n = seqs.shape
    positions = np.arange(1, n + 1)  # 1-indexed positions of seqs[:, 0..n-1]
    table = np.zeros((b, n + 1), dtype=np.int64)
    for letter in range(alphabet_size):
        # last_seen[:, i-1] = last 1-indexed m <= i with v_m == letter (0 if none)
        last_seen = np.maximum.accumulate(np.where(seqs == letter, positions, 0), axis=1)
        # find_1 looks strictly before i: last m <= i-1, then steps one right (m + 1).
        before = np.concatenate([np.zeros((b, 1), dtype=np.int64), last_seen[:, :-1]], axis=1)
        hit = np.where(before > 0, before + 1, 0)
        table[:, 1:] = np.where(seqs == letter, hit, table[:, 1:])
    return table


def follow_hops(
    seqs: np.ndarray, alphabet_size: int, hops: int | np.ndarray, every_position: bool = False
) -> np.ndarray:
    """``find_hops(v, n)`` for every row, or ``find_hops(v, i)`` for every i (``[b n]``); 0 where the chain breaks.

    ``hops`` is one count for every row or one per row (``[b]``).
    """
    table = hop_table(seqs, alphabet_size)
    b, n = seqs.shape
    rows = np.arange(b)[:, None] if every_position else np.arange(b)
    pos = np.broadcast_to(np.arange(1, n + 1), (b, n)) if every_position else np.full(b, n, dtype=np.int64)
    per_row = np.broadcast_to(np.asarray(hops), (b,))
    per_row = per_row[:, None] if every_position else per_row
    for step in range(int(per_row.max(initial=0))):
        pos = np.where(step < per_row, table[rows, pos], pos)
    return pos


class PHop(SyntheticTask):
    """p-hop induction with the answer at the end of the sequence.

    Args:
        alphabet_size: letters in the sequence (the paper: 4).
        length: n, letters per sequence (the paper: 256).
        hops: p, induction hops to follow (the paper: 16 and 32).
        supervise: ``last`` trains on the answer at the end only (the paper's Table 1);
            ``all`` also trains on ``v[find_p(v, i)]`` at every position i whose chain exists
            (Sanford et al.'s sequence-to-sequence form: n times the signal per sample).
            Validation and test always score the last position.
        eval_hops: evaluate on one named set per hop count (``hops1``, ``hops2``, ...) instead of
            ``hops`` alone: samples whose required depth is known, for asking whether an exit rule
            spends more loops on deeper problems (``AdaptiveExit`` logs mean loops per set).
        train_hops: train on a mix of hop counts, one drawn uniformly per sample and written in its
            query token (``=1``, ``=2``, ...; module doc); ``hops`` and ``eval_hops`` must be among them.
        **kwargs: batch sizes, eval set sizes, seed, workers (see ``SyntheticTask``).
    """

    def __init__(
        self,
        alphabet_size: int = 4,
        length: int = 256,
        hops: int = 16,
        supervise: Literal["last", "all"] = "last",
        eval_hops: list[int] | None = None,
        train_hops: list[int] | None = None,
        **kwargs,
    ) -> None:
        self.eval_hops = list(eval_hops or [])
        self.train_hops = sorted(set(train_hops or []))
        self.eval_names = [f"hops{h}" for h in self.eval_hops]  # before SyntheticTask draws the sets
        super().__init__(**kwargs)
        self.supervise = supervise
        if not 2 <= alphabet_size <= 26:
            raise InputError(f"data.alphabet_size must lie in 2..26, got {alphabet_size}")
        if hops < 1:
            raise InputError(f"data.hops must be >= 1, got {hops}")
        if length <= hops:
            # Each hop either moves left or sits on a fixed point (v_{i-1} = v_i); with
            # n <= p every chain would end on one, and the answer would just be a repeat.
            raise InputError(
                f"data.hops={hops} is impossible for data.length={length}: a chain can move left at most "
                f"{length - 1} times. Use data.length > data.hops (the paper: 256 letters for 16 and 32 hops)."
            )
        if any(h < 1 or h >= length for h in self.eval_hops):
            raise InputError(f"data.eval_hops: every hop count must lie in 1..{length - 1}, got {self.eval_hops}")
        if self.train_hops and any(h < 1 or h >= length for h in self.train_hops):
            raise InputError(f"data.train_hops: every hop count must lie in 1..{length - 1}, got {train_hops}")
        unseen = sorted({hops, *self.eval_hops} - set(self.train_hops)) if self.train_hops else []
        if unseen:
            raise InputError(
                f"data.train_hops: {self.train_hops} does not include the evaluated hop counts {unseen} "
                "(data.hops, data.eval_hops); add them, or evaluate only depths the model is trained on"
            )
        self.alphabet_size, self.length, self.hops = alphabet_size, length, hops
        self._chain_rate = {h: self._check_chain_rate(h, key) for h, key in self._hop_counts()}

    def _hop_counts(self) -> list[tuple[int, str]]:
        return [
            (self.hops, "data.hops"),
            *((h, "data.eval_hops") for h in self.eval_hops),
            *((h, "data.train_hops") for h in self.train_hops),
        ]

    def _check_chain_rate(self, hops: int, key: str) -> float:
        """Refuse hop counts whose chain almost never exists in a sequence this short."""
        probe = np.random.default_rng(0).integers(0, self.alphabet_size, size=(2048, self.length))
        rate = float((follow_hops(probe, self.alphabet_size, hops) > 0).mean())
        if rate < 0.05:  # >95% of draws wasted, and the survivors mostly end on fixed points
            raise InputError(
                f"{key}: {hops} hops are impossible in practice for data.length={self.length} "
                f"(alphabet {self.alphabet_size}): the {hops}-hop chain exists in only {rate:.1%} of "
                f"random sequences. Raise data.length (about {self.alphabet_size * hops * 2} works) "
                "or use fewer hops."
            )
        return rate

    @property
    def vocab(self) -> list[str]:
        letters = list(string.ascii_lowercase[: self.alphabet_size])
        return letters + ([f"={h}" for h in range(1, max(self.train_hops) + 1)] if self.train_hops else ["="])

    def query_token(self, hops: int) -> int:
        """The token after the letters: ``=``, or ``=p`` saying the hop count (``train_hops``)."""
        return self.alphabet_size + (hops - 1 if self.train_hops else 0)

    @property
    def seq_len(self) -> int:
        return self.length + 1

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.train_hops:
            return self.draw(rng, n, self.hops)
        counts = rng.multinomial(n, [1 / len(self.train_hops)] * len(self.train_hops))
        parts = [self.draw(rng, int(c), h) for h, c in zip(self.train_hops, counts) if c]
        order = rng.permutation(n)  # mixed within a batch, not in runs of one depth
        return np.concatenate([x for x, _ in parts])[order], np.concatenate([y for _, y in parts])[order]

    def generate_eval(self, name: str, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.draw(rng, n, int(name.removeprefix("hops")))

    def draw(self, rng: np.random.Generator, n: int, hops: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` sequences whose ``hops``-hop chain exists, with the answer at the end."""

        def chains_that_exist(m: int) -> tuple[np.ndarray, np.ndarray]:
            seqs = rng.integers(0, self.alphabet_size, size=(m, self.length), dtype=np.int64)
            pos = follow_hops(seqs, self.alphabet_size, hops)
            ok = pos > 0
            return seqs[ok], seqs[ok, pos[ok] - 1]

        seqs, answer = draw_kept(n, self._chain_rate[hops], chains_that_exist)
        return answer_at_end(seqs, answer, separator=self.query_token(hops))

    def labels_at_every_position(self, input_ids: np.ndarray) -> np.ndarray:
        """Label position i-1 (the token v_i) with ``v[find_p(v, i)]``, and ``=`` with the final answer
        (p: each sample's own, read from its query token, with ``train_hops``)."""
        seqs = input_ids[:, :-1]
        hops = input_ids[:, -1] - self.alphabet_size + 1 if self.train_hops else self.hops
        pos = follow_hops(seqs, self.alphabet_size, hops, every_position=True)
        answer = np.take_along_axis(seqs, np.maximum(pos - 1, 0), axis=1)
        labels = np.full_like(input_ids, IGNORE)
        labels[:, :-1] = np.where(pos > 0, answer, IGNORE)
        labels[:, -1] = answer[:, -1]
        return labels
