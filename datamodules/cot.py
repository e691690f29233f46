"""The shared sample format of the chain-of-thought DP tasks (Feng et al. 2023): ``direct`` and ``cot``.

Every row is ::

    [<pad> ..  prompt] [CoT (cot format only)] <ans> answer <eos> [<pad> ..]
    |---- prompt_len ---|

* The prompt is LEFT-padded to ``prompt_len`` (fixed per setting), so every
  row's prompt ends at the same column and generation starts at ``prompt_len``.
* Everything after the prompt is what the model writes, and is labelled:
  the CoT, the answer marker ``<ans>``, the one-token answer and ``<eos>``.
  Labels follow the repository's convention (the model is causal, cross-entropy
  of ``logits[:, i]`` against ``labels[:, i]``): ``labels[:, i] = input_ids[:, i+1]``
  for ``prompt_len-1 <= i < position of <eos>``, -100 elsewhere. In ``direct``
  the model writes only ``<ans> answer <eos>`` (the marker is trivially
  predictable; labelling it keeps one decoding rule for both formats).
* Rows are right-padded to ``seq_len``, the longest possible row of the setting.

Decoding rule shared with ``LoopedLM``: greedily continue from the prompt; the
final answer is the token right before the first ``<eos>`` (``eos_id``).
Evaluation batches also carry ``prompt_len`` and ``answer`` (gold answer token),
both ``[b]`` int64.

A task subclass defines its own tokens (``task_tokens``), the bounds
``max_prompt_len`` / ``max_cot_len``, and ``sample(rng, n)``, which returns
left-aligned prompts and CoTs with their lengths and the answer tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from looped.contract import IGNORE
from looped.datamodules.base import SyntheticTask
from looped.errors import InputError

PAD, EOS, ANSWER = "<pad>", "<eos>", "<ans>"
SPECIAL = [PAD, EOS, ANSWER]  # ids 0, 1, 2 in every CoT task
FORMATS = ("direct", "cot")


@dataclass
class Parts:
    """What a task draws for ``n`` samples; rows are left-aligned, lengths say how much of a row is real."""

    prompt: np.ndarray  # [n, max_prompt_len] token ids
    prompt_len: np.ndarray  # [n]
    cot: np.ndarray  # [n, max_cot_len] token ids ([n, 0] in the direct format)
    cot_len: np.ndarray  # [n]
    answer: np.ndarray  # [n] the answer's token id


class CoTTask(SyntheticTask):
    """Base of the chain-of-thought tasks: one sample layout for ``direct`` and ``cot``.

    Args:
        format: ``cot`` (the model writes the intermediate steps, then the answer) or
            ``direct`` (the answer right after the prompt).
        max_seq_len: refuse settings whose rows would be longer than this (a guard against a
            typo such as ``size: 200`` building a 40k-token edit-distance table).
        **kwargs: batch sizes, eval set sizes, seed, workers (see ``SyntheticTask``).
    """

    def __init__(self, format: Literal["direct", "cot"] = "cot", max_seq_len: int = 4096, **kwargs) -> None:
        super().__init__(**kwargs)
        if format not in FORMATS:
            raise InputError(f"data.format must be 'direct' or 'cot', got {format!r}")
        self.format = format
        self.max_seq_len = max_seq_len

    def _check_length(self) -> None:
        """Call at the end of a subclass's ``__init__``, once the bounds are known."""
        if self.seq_len > self.max_seq_len:
            raise InputError(
                f"{type(self).__name__}: data.size={self.size} in the {self.format} format gives rows of "
                f"{self.seq_len} tokens, more than data.max_seq_len={self.max_seq_len}; lower data.size "
                "or raise data.max_seq_len"
            )

    # -- what a task defines ------------------------------------------------------
    task_tokens: list[str]
    max_prompt_len: int
    max_cot_len: int
    size: int

    def sample(self, rng: np.random.Generator, n: int) -> Parts:
        """Draw ``n`` problems with their CoT (an empty one in the direct format) and answer."""
        raise NotImplementedError

    # -- the layout --------------------------------------------------------------------
    @property
    def vocab(self) -> list[str]:
        return SPECIAL + self.task_tokens

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    @property
    def answer_marker_id(self) -> int:
        return 2

    @property
    def prompt_len(self) -> int:
        """Column where every row's prompt ends and generation starts."""
        return self.max_prompt_len

    @property
    def seq_len(self) -> int:
        cot = self.max_cot_len if self.format == "cot" else 0
        return self.max_prompt_len + cot + 3  # + <ans> answer <eos>

    def token(self, name: str) -> int:
        return self.token_ids[name]

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        parts = self.sample(rng, n)
        if self.format == "direct":
            parts.cot_len = np.zeros(n, dtype=np.int64)
        P, T = self.max_prompt_len, self.seq_len
        cols = np.arange(T)[None, :]
        ids = np.full((n, T), self.pad_id, dtype=np.int64)
        # Prompt, right-aligned to column P: column c holds prompt[c - (P - len)].
        src = cols[:, :P] - (P - parts.prompt_len)[:, None]
        ids[:, :P] = np.where(src >= 0, np.take_along_axis(parts.prompt, np.clip(src, 0, None), axis=1), self.pad_id)
        if self.format == "cot" and parts.cot.shape[1]:
            C = parts.cot.shape[1]
            ids[:, P : P + C] = np.where(np.arange(C)[None, :] < parts.cot_len[:, None], parts.cot, self.pad_id)
        rows = np.arange(n)
        end = P + parts.cot_len  # column of <ans>
        ids[rows, end] = self.answer_marker_id
        ids[rows, end + 1] = parts.answer
        ids[rows, end + 2] = self.eos_id
        labels = np.full_like(ids, IGNORE)
        written = (cols >= P - 1) & (cols <= (end + 1)[:, None])  # positions whose NEXT token is written
        labels[:, :-1] = np.where(written[:, :-1], ids[:, 1:], IGNORE)
        return ids, labels

    # -- evaluation extras and text ------------------------------------------------------
    def eval_extras(self, input_ids: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        """``prompt_len`` (the generation start) and ``answer`` (gold token before the first ``<eos>``)."""
        first_eos = np.argmax(input_ids == self.eos_id, axis=1)
        return {
            "prompt_len": np.full(len(input_ids), self.prompt_len, dtype=np.int64),
            "answer": input_ids[np.arange(len(input_ids)), first_eos - 1].astype(np.int64),
        }

    def decode(self, ids) -> str:
        """Space-separated tokens, padding and ids outside the vocabulary (e.g. -100) dropped."""
        return " ".join(self.vocab[i] for i in np.asarray(ids).tolist() if 0 < i < self.vocab_size)

    def describe(self) -> str:
        x, _ = self.generate(self.rng(0, 0, 0), 1)
        return (
            f"{type(self).__name__} (size={self.size}, format={self.format}): vocab ({self.vocab_size}) = "
            f"{' '.join(self.vocab)}\n  prompt_len = {self.prompt_len}, seq_len = {self.seq_len}, "
            f"eos_id = {self.eos_id}\n  example: {self.decode(x[0])}"
        )
