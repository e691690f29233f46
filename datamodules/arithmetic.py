"""Arithmetic expressions over the integers mod p (Feng et al. 2023, "Towards Revealing the Mystery behind CoT").

A prompt is an expression with ``size`` operators over the numbers ``0 … p-1``
(p = 11 in the paper; each number one token) with ``+ - * /`` and parentheses,
``/`` being multiplication by the modular inverse::

    direct:  2 * ( 7 - 3 ) / 4 <ans> 2 <eos>
    cot:     2 * ( 7 - 3 ) / 4 = 2 * 4 / 4 = 8 / 4 <ans> 2 <eos>

The chain of thought writes the expression after each single operation, in the
order a left-to-right evaluator performs them (the leftmost operation whose two
operands are numbers and that precedence allows next), parentheses around a
reduced operation dropping with it; ``<ans>`` replaces the last ``=``.

Expressions are drawn as in the paper: start from a uniform number (the answer),
then ``size`` times replace a uniformly chosen number ``x`` by ``a op b`` with
``a op b = x`` (op uniform, ``a`` uniform where possible), and print with only the
parentheses the standard precedence needs. A divisor is always a subtree that
was expanded from a non-zero number, so no step ever divides by 0.
"""

from __future__ import annotations

import numpy as np

from looped.datamodules.cot import CoTTask, Parts
from looped.errors import InputError

OPERATORS = ("+", "-", "*", "/")
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


class ModularArithmetic(CoTTask):
    """Evaluate an expression mod ``modulus``, directly or by writing every reduction step.

    Args:
        size: operators per expression (the paper: 4, 5, 6).
        modulus: a prime p (so every non-zero number has an inverse); numbers are ``0 … p-1``.
        format: ``cot`` or ``direct`` (see ``looped.datamodules.cot``).
        **kwargs: ``max_seq_len``, batch sizes, eval set sizes, seed, workers.
    """

    def __init__(self, size: int = 5, modulus: int = 11, **kwargs) -> None:
        super().__init__(**kwargs)
        if size < 1:
            raise InputError(f"data.size (operators per expression) must be >= 1, got {size}")
        if modulus < 2 or any(modulus % d == 0 for d in range(2, int(modulus**0.5) + 1)):
            raise InputError(f"data.modulus must be a prime (division needs inverses), got {modulus}")
        self.size, self.modulus = size, modulus
        self.inverse = [0] + [pow(v, modulus - 2, modulus) for v in range(1, modulus)]
        self.task_tokens = [str(v) for v in range(modulus)] + list(OPERATORS) + ["(", ")", "="]
        # k operators: k+1 numbers and at most k-1 bracket pairs (the root needs none).
        self.max_prompt_len = 4 * size - 1
        self.max_cot_len = sum(1 + 4 * k - 1 for k in range(1, size))  # "=" + expression, k = size-1 … 1
        self._check_length()

    # -- expressions as trees: a leaf is an int, a node is [op, left, right] -------------
    def _apply(self, op: str, a: int, b: int) -> int:
        p = self.modulus
        if op == "+":
            return (a + b) % p
        if op == "-":
            return (a - b) % p
        if op == "*":
            return a * b % p
        return a * self.inverse[b] % p

    def _operands(self, x: int, op: str, u1: float, u2: float) -> tuple[int, int]:
        """``(a, b)`` with ``a op b = x``, drawn from two uniforms."""
        p = self.modulus
        if op == "+":
            a = int(u1 * p)
            return a, (x - a) % p
        if op == "-":
            a = int(u1 * p)
            return a, (a - x) % p
        if op == "*":
            if x != 0:
                a = 1 + int(u1 * (p - 1))
                return a, x * self.inverse[a] % p
            a = int(u1 * p)
            return a, (0 if a else int(u2 * p))
        b = 1 + int(u1 * (p - 1))
        return x * b % p, b

    def _print(self, node, out: list) -> None:
        if isinstance(node, int):
            out.append(node)
            return
        op, left, right = node
        for side, child in ((0, left), (1, right)):
            if side:
                out.append(op)
            bracket = not isinstance(child, int) and (
                PRECEDENCE[child[0]] < PRECEDENCE[op]
                or (side and PRECEDENCE[child[0]] == PRECEDENCE[op] and op in "-/")
            )
            if bracket:
                out.append("(")
            self._print(child, out)
            if bracket:
                out.append(")")

    @staticmethod
    def _parse(tokens: list):
        """Tree of the printed text under the usual precedence, left-associative (what a reader sees)."""
        pos = 0

        def expression(level: int):
            nonlocal pos
            if level == 3:
                token = tokens[pos]
                pos += 1
                if token == "(":
                    node = expression(1)
                    pos += 1  # ")"
                    return node
                return token
            node = expression(level + 1)
            while pos < len(tokens) and tokens[pos] in PRECEDENCE and PRECEDENCE[tokens[pos]] == level:
                op = tokens[pos]
                pos += 1
                node = [op, node, expression(level + 1)]
            return node

        return expression(1)

    def _reduce_once(self, node):
        """Evaluate the leftmost operation whose operands are numbers; returns the new tree."""
        op, left, right = node
        if isinstance(left, int) and isinstance(right, int):
            return self._apply(op, left, right)
        if not isinstance(left, int):
            return [op, self._reduce_once(left), right]
        return [op, left, self._reduce_once(right)]

    def _encode(self, tokens: list) -> list[int]:
        offset, ids = 3, self._token_ids
        return [offset + t if isinstance(t, int) else ids[t] for t in tokens]

    def sample(self, rng: np.random.Generator, n: int) -> Parts:
        self._token_ids = {t: self.token(t) for t in (*OPERATORS, "(", ")", "=")}
        k = self.size
        start = rng.integers(0, self.modulus, size=n)
        where, ops, u1, u2 = rng.random((n, k)), rng.integers(0, 4, size=(n, k)), rng.random((n, k)), rng.random((n, k))
        prompt = np.zeros((n, self.max_prompt_len), dtype=np.int64)
        cot = np.zeros((n, self.max_cot_len if self.format == "cot" else 0), dtype=np.int64)
        prompt_len, cot_len = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        equals = self._token_ids["="]
        for r in range(n):
            root = [int(start[r])]  # a holder, so the root leaf can be replaced like any other
            leaves = [(root, 0)]
            for step in range(k):
                holder, i = leaves.pop(int(where[r, step] * len(leaves)))
                op = OPERATORS[ops[r, step]]
                a, b = self._operands(holder[i], op, u1[r, step], u2[r, step])
                node = [op, a, b]
                holder[i] = node
                leaves += [(node, 1), (node, 2)]
            tokens: list = []
            self._print(root[0], tokens)
            ids = self._encode(tokens)
            prompt[r, : len(ids)], prompt_len[r] = ids, len(ids)
            if self.format == "cot":
                tree, chain = self._parse(tokens), []
                for _ in range(k - 1):
                    tree = self._reduce_once(tree)
                    step_tokens: list = []
                    self._print(tree, step_tokens)
                    chain.append(equals)
                    chain += self._encode(step_tokens)
                cot[r, : len(chain)], cot_len[r] = chain, len(chain)
        return Parts(prompt, prompt_len, cot, cot_len, answer=3 + start)
