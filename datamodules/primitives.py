"""Reasoning primitives: variable assignment (Table 3 of Saunshi et al. 2025).

Depth 0 asks for a variable that holds a value (``a=1, b=2, c=6, b=?`` → ``2``);
depth 1 asks for a variable assigned another variable, which holds the value
(``a=1, b=2, c=a, d=b, d=?`` → ``2``). Each comes in two flavours:

* ``math``: statements ``x=v`` joined by ``,``, the query ``x=?``;
  decoded ``a=1, b=2, c=a, d=b, d=?``.
* ``code``: Python statements ``x = v`` joined by ``;``, the query ``print ( x )``;
  decoded ``a = 1 ; b = 2 ; c = a ; d = b ; print ( d )``. Every statement that
  reads a variable comes after the statement that assigns it, so the text runs
  as Python.

Tokens are words: ``<pad>``, the letters ``a``–``z`` (variable names), the
values ``0``…``num_values-1`` (one token each), ``= , ? ;``, ``print ( )`` and a
newline. Both flavours share one vocabulary, so one model can see either.

A k-shot prompt (``shots=k``) is k solved examples, each followed by its answer
and an example separator (``;`` in math, a newline in code), then the query:
``a=3, b=? 3; c=1, d=7, c=? 1; e=5, f=2, f=?``. Only the final answer is
labelled, at the prompt's last token (the model is causal: the label at
position t is the token that follows t).

Every sample of one setting has the same length by construction (a fixed
number of one-token names and values), so padding only appears with
``pad_to``: ``<pad>`` tokens are added at the START (left padding), which keeps
the answer at the last position for every setting; padding is never labelled.
"""

from __future__ import annotations

import string
from typing import Literal

import numpy as np

from looped.contract import IGNORE
from looped.datamodules.base import SyntheticTask
from looped.errors import InputError

LETTERS = list(string.ascii_lowercase)
PAD = "<pad>"
SYMBOLS = ["=", ",", "?", ";", "print", "(", ")", "\n"]


class ReasoningPrimitives(SyntheticTask):
    """Variable-assignment primitives, for training and as a k-shot evaluation set.

    Args:
        depth: 0 queries a variable holding a value; 1 queries a variable assigned
            another variable (the chain must be followed once).
        flavour: ``math`` (``a=1, c=a, c=?``) or ``code`` (``a = 1 ; c = a ; print ( c )``).
        num_values: values are ``0 … num_values-1`` (sampled with replacement).
        num_variables: direct ``variable = value`` assignments per example; depth 1
            adds as many ``variable = variable`` assignments, each reading one of them.
        shots: solved examples before the query (the paper evaluates 5-shot).
        pad_to: left-pad every sample with ``<pad>`` to this length (default: no padding),
            so that settings of different sizes share one sequence length.
        supervise: ``last`` trains on the final answer only; ``all`` also labels every variable
            read on a right-hand side (``c=a``: the ``a``) with that variable's value, the one hop
            that the query's chain repeats. Evaluation always scores the final answer alone.
        **kwargs: batch sizes, eval set sizes, seed, workers (see ``SyntheticTask``).
    """

    def __init__(
        self,
        depth: int = 1,
        flavour: Literal["math", "code"] = "math",
        num_values: int = 10,
        num_variables: int = 4,
        shots: int = 0,
        pad_to: int | None = None,
        supervise: Literal["last", "all"] = "last",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.supervise = supervise
        if depth not in (0, 1):
            raise InputError(f"data.depth must be 0 or 1, got {depth}")
        if flavour not in ("math", "code"):
            raise InputError(f"data.flavour must be 'math' or 'code', got {flavour!r}")
        if num_values < 2:
            raise InputError(f"data.num_values must be >= 2, got {num_values}")
        if num_variables < 1:
            raise InputError(f"data.num_variables must be >= 1, got {num_variables}")
        names = num_variables * (depth + 1)
        if names > len(LETTERS):
            raise InputError(
                f"data.num_variables={num_variables} needs {names} distinct variable names at depth {depth}, "
                f"but only {len(LETTERS)} letters exist; use data.num_variables <= {len(LETTERS) // (depth + 1)}"
            )
        if shots < 0:
            raise InputError(f"data.shots must be >= 0, got {shots}")
        self.depth, self.flavour, self.shots = depth, flavour, shots
        self.num_values, self.num_variables = num_values, num_variables
        if pad_to is not None and pad_to < self.natural_len:
            raise InputError(
                f"data.pad_to={pad_to} is shorter than a sample of this setting ({self.natural_len} tokens)"
            )
        self.pad_to = pad_to

    # -- vocabulary and lengths ------------------------------------------------
    @property
    def vocab(self) -> list[str]:
        return [PAD] + LETTERS + [str(v) for v in range(self.num_values)] + SYMBOLS

    @property
    def statements(self) -> int:
        return self.num_variables * (self.depth + 1)

    @property
    def example_len(self) -> int:
        """Tokens of one unsolved example: 4 per statement (name, =, value, separator) and the query."""
        return 4 * self.statements + (3 if self.flavour == "math" else 4)

    @property
    def natural_len(self) -> int:
        return (self.shots + 1) * self.example_len + 2 * self.shots  # + answer and separator per shot

    @property
    def seq_len(self) -> int:
        return self.pad_to or self.natural_len

    def decode(self, ids) -> str:
        """``a=1, b=? 1; c=2, c=?`` (math) or ``a = 1 ; print ( a ) 1`` / newline / … (code)."""
        tokens = [self.vocab[i] for i in np.asarray(ids).tolist() if 0 < i < self.vocab_size]
        if self.flavour == "code":
            return "\n".join(" ".join(line).strip() for line in _split(tokens, "\n"))
        text = ""
        for i, token in enumerate(tokens):
            text += token
            if token in (",", ";", "?") and i < len(tokens) - 1:
                text += " "
        return text

    # -- generation --------------------------------------------------------------
    def _examples(self, rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
        """``m`` examples without their answer: tokens ``[m example_len]`` and answer ids ``[m]``."""
        n, s = self.num_variables, self.statements
        letter0, value0 = self.token_ids["a"], self.token_ids["0"]
        # Names without replacement per example: the first n hold values, the rest read them.
        names = np.argsort(rng.random((m, len(LETTERS))), axis=1)[:, :s]
        values = rng.integers(0, self.num_values, size=(m, n))
        rhs = value0 + values
        keys = rng.random((m, s))  # statement order: sort by key
        if self.depth == 1:
            source = rng.integers(0, n, size=(m, n))  # which direct variable each indirect one reads
            rhs = np.concatenate([rhs, letter0 + np.take_along_axis(names, source, axis=1)], axis=1)
            # An indirect statement sorts after its source (uniformly in between), so
            # the chain is rarely adjacent and the code flavour runs as Python.
            source_key = np.take_along_axis(keys[:, :n], source, axis=1)
            keys[:, n:] = source_key + (1 - source_key) * rng.random((m, n))
            answer = np.take_along_axis(values, source, axis=1)
        else:
            answer = values
        # Depth 0 queries a direct variable, depth 1 an indirect one (never one holding a value).
        query = rng.integers(0, n, size=m)
        rows = np.arange(m)
        query_name = letter0 + names[rows, s - n + query]
        answer = value0 + answer[rows, query]

        order = np.argsort(keys, axis=1)
        lhs = letter0 + np.take_along_axis(names, order, axis=1)
        rhs = np.take_along_axis(rhs, order, axis=1)
        sep = self.token_ids["," if self.flavour == "math" else ";"]
        body = np.stack([lhs, np.full_like(lhs, self.token_ids["="]), rhs, np.full_like(lhs, sep)], axis=2)
        body = body.reshape(m, 4 * s)
        if self.flavour == "math":
            tail = [query_name, np.full(m, self.token_ids["="]), np.full(m, self.token_ids["?"])]
        else:
            tail = [
                np.full(m, self.token_ids["print"]),
                np.full(m, self.token_ids["("]),
                query_name,
                np.full(m, self.token_ids[")"]),
            ]
        return np.concatenate([body, np.stack(tail, axis=1)], axis=1), answer

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        k = self.shots
        tokens, answer = self._examples(rng, n * (k + 1))
        tokens, answer = tokens.reshape(n, k + 1, -1), answer.reshape(n, k + 1)
        separator = self.token_ids[";" if self.flavour == "math" else "\n"]
        parts = []
        for shot in range(k):
            parts += [tokens[:, shot], answer[:, shot, None], np.full((n, 1), separator)]
        parts.append(tokens[:, k])
        pad = np.full((n, self.seq_len - self.natural_len), self.token_ids[PAD])
        input_ids = np.concatenate([pad, *parts], axis=1).astype(np.int64)
        labels = np.full_like(input_ids, IGNORE)
        labels[:, -1] = answer[:, k]
        return input_ids, labels

    def labels_at_every_position(self, input_ids: np.ndarray) -> np.ndarray:
        """Each right-hand-side variable labelled with its value; the last position with the answer.

        Read back from the tokens, left to right (every variable is assigned before it is read,
        and a name's latest assignment is the one in force, also across the shots of a prompt).
        """
        m, t = input_ids.shape
        rows = np.arange(m)
        letter0, value0 = self.token_ids["a"], self.token_ids["0"]
        is_letter = (input_ids >= letter0) & (input_ids < letter0 + len(LETTERS))
        is_value = (input_ids >= value0) & (input_ids < value0 + self.num_values)
        value_of = np.full((m, len(LETTERS)), IGNORE, dtype=np.int64)  # value token of each name
        labels = np.full_like(input_ids, IGNORE)
        for i in range(1, t - 1):  # an assignment: name at i-1, '=' at i, right-hand side at i+1
            assign = (input_ids[:, i] == self.token_ids["="]) & is_letter[:, i - 1]
            name = np.where(assign, input_ids[:, i - 1] - letter0, 0)
            rhs = input_ids[:, i + 1]
            read = assign & is_letter[:, i + 1]
            held = np.where(read, value_of[rows, np.where(read, rhs - letter0, 0)], IGNORE)
            labels[:, i + 1] = np.where(read, held, IGNORE)
            new = np.where(is_value[:, i + 1], rhs, held)
            value_of[rows, name] = np.where(assign & (read | is_value[:, i + 1]), new, value_of[rows, name])
        query = input_ids[:, -3 if self.flavour == "math" else -2]  # x=?  |  print ( x )
        labels[:, -1] = value_of[rows, query - letter0]
        return labels


def _split(tokens: list[str], separator: str) -> list[list[str]]:
    lines: list[list[str]] = [[]]
    for token in tokens:
        if token == separator:
            lines.append([])
        else:
            lines[-1].append(token)
    return lines
