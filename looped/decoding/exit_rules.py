"""The exit rules — when has a token looped enough? — one definition each, decided online and offline.

=============  ===============================================================  ==========================
rule           a token stops after loop n when                                  its signal at loop n
=============  ===============================================================  ==========================
``fixed``      never early: n = the last loop                                   none
``entropy_τ``  the prediction's entropy ``H(p_n) < τ`` (Huginn)                 ``H(p_n)``
``kl_τ``       ``KL(p_n ‖ p_{n−1}) < τ``, n ≥ 2                                 the KL; +inf at loop 1
``stable_m``   the argmax is unchanged over the last m loops, n ≥ m + 1         argmax unchanged from n−1
``gate_q``     the learned gate's cumulative exit probability reaches q (Ouro)  ``Σ_{j≤n} p(j)``
=============  ===============================================================  ==========================

``OnlineExit.decide`` is the rule, applied loop after loop to one signal per row. Decoding
(``looped.decoding.per_token``, ``looped.decoding.depthwise``) gets each row's signal from the readout
of its one new token (``OnlineExit.stop``); evaluation (``looped.evaluation.exits``) gets every loop's
signal for every sample at once from one evaluation pass — the worst over the sample's labelled
positions, so a sample stops only when all of them have settled — and runs the same ``decide`` over
the loops (``exit_loops``). A token that never settles runs to the last loop.

Dimension letters: b rows (samples), v vocabulary, n loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

RULES = ("fixed", "entropy", "kl", "stable", "gate")


def entropy(logprobs: Tensor) -> Tensor:
    """``[...]`` entropy (nats) of distributions given as log-probabilities ``[... v]``."""
    return -(logprobs.exp() * logprobs).sum(-1)


def kl_from_previous(logprobs: Tensor, previous: Tensor) -> Tensor:
    """``[...]`` ``KL(p_n ‖ p_{n−1})`` from log-probabilities ``[... v]`` of loop n and of loop n − 1."""
    return F.kl_div(previous, logprobs, reduction="none", log_target=True).sum(-1)  # kl_div(q, p) is KL(p ‖ q)


@dataclass(frozen=True)
class ExitRule:
    """An exit rule and its parameter, written ``entropy_0.5`` (``parse``)."""

    kind: Literal["fixed", "entropy", "kl", "stable", "gate"]
    value: float = 0.0

    @classmethod
    def parse(cls, text: str) -> ExitRule:
        kind, _, value = text.partition("_")
        if kind not in RULES or (kind == "fixed") != (value == ""):
            raise ValueError(
                f"exit rule {text!r}: write fixed, entropy_<nats>, kl_<nats>, stable_<loops> or gate_<quantile> "
                "(e.g. entropy_0.5, stable_2, gate_0.5)"
            )
        try:
            number = float(value or 0)
        except ValueError:
            raise ValueError(f"exit rule {text!r}: {value!r} is not a number") from None
        if kind == "stable" and (number < 1 or number != int(number)):
            raise ValueError(f"exit rule {text!r}: stable needs a whole number of loops >= 1")
        return cls(kind, number)

    @property
    def reads_prediction(self) -> bool:
        return self.kind in ("entropy", "kl", "stable")


class OnlineExit:
    """Decides, loop after loop, which rows stop: the rule's running state per row, reset when a row starts a
    new token (``restart``, depth-wise decoding) or dropped with rows that left (``keep``)."""

    def __init__(self, rule: ExitRule, batch: int, device: torch.device) -> None:
        self.rule = rule
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)  # loops decided on for this token
        self.previous: Tensor | None = None  # [b v] log-probabilities of the last loop (kl)
        self.argmax = torch.zeros(batch, dtype=torch.long, device=device)  # the last loop's argmax (stable)
        self.unchanged = torch.zeros(batch, dtype=torch.long, device=device)  # stable: the current run's length
        self.cdf = torch.zeros(batch, device=device)  # gate: probability of having exited by now
        self.survival = torch.ones(batch, device=device)  # gate: probability of not having exited

    def decide(self, signal: Tensor | None) -> Tensor:
        """``[b]`` bool: which rows stop after this loop, from this loop's signal ``[b]`` (the module's table)."""
        first, kind, value = self.seen == 0, self.rule.kind, self.rule.value
        self.seen = self.seen + 1
        if kind == "fixed":
            return torch.zeros_like(first)
        if kind == "stable":
            self.unchanged = torch.where(~first & signal, self.unchanged + 1, 0)
            return self.unchanged >= value
        if kind == "gate":
            return signal >= value
        if kind == "kl":  # no previous loop to compare with at a token's first
            return ~first & (signal < value)
        return signal < value  # entropy

    def stop(self, logprobs: Tensor | None, halt_logits: Tensor | None) -> Tensor:
        """``[b]`` bool: which rows stop after this loop, from its log-probabilities ``[b v]`` (the rules that read
        the prediction) or the gate's halting logits ``[b]`` (rule ``gate``) of each row's one token."""
        return self.decide(self.signal(logprobs, halt_logits))

    def signal(self, logprobs: Tensor | None, halt_logits: Tensor | None) -> Tensor | None:
        """Each row's signal at this loop (before ``decide`` counts it) from its token's readout or halting logit."""
        kind, first = self.rule.kind, self.seen == 0
        if kind == "entropy":
            return entropy(logprobs)
        if kind == "kl":
            previous = logprobs if self.previous is None else self.previous
            self.previous = logprobs
            return torch.where(first, float("inf"), kl_from_previous(logprobs, previous))
        if kind == "stable":
            argmax = logprobs.argmax(-1)
            unchanged, self.argmax = argmax == self.argmax, argmax
            return unchanged
        if kind == "gate":  # p(n) = λ_n ∏_{j<n} (1 − λ_j), as looped.training.halting's exit distribution
            halt = torch.sigmoid(halt_logits.float())
            self.cdf = torch.where(first, 0, self.cdf) + torch.where(first, 1, self.survival) * halt
            self.survival = torch.where(first, 1, self.survival) * (1 - halt)
            return self.cdf
        return None

    def keep(self, rows: Tensor) -> None:
        """Keep the state of ``rows`` (a bool mask over the rows) only."""
        self.seen, self.argmax, self.unchanged = self.seen[rows], self.argmax[rows], self.unchanged[rows]
        self.cdf, self.survival = self.cdf[rows], self.survival[rows]
        self.previous = None if self.previous is None else self.previous[rows]

    def restart(self, rows: Tensor) -> None:
        """``rows`` (a bool mask) start a new token: their next loop is its first."""
        self.seen = self.seen.masked_fill(rows, 0)


def exit_loops(rule: ExitRule, signals: Tensor) -> Tensor:
    """``[b]`` 1-based exit loop of every row from its signals at every loop ``[n b]``: the first loop ``decide``
    stops it at, the last loop (n) when none does. Evaluation's exits, the rule run as decoding runs it."""
    loops, batch = signals.shape
    decide = OnlineExit(rule, batch, signals.device)
    exits = torch.full((batch,), loops, dtype=torch.long, device=signals.device)
    going = torch.ones(batch, dtype=torch.bool, device=signals.device)
    for n in range(1, loops + 1):
        stop = decide.decide(signals[n - 1]) & going
        exits = exits.masked_fill(stop, n)
        going &= ~stop
    return exits
