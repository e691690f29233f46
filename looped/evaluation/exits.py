"""Adaptive exit: stop looping a sequence once its prediction has settled.

A looped model can run any number of loops at inference. Instead of a fixed
``L`` for every sequence, each one stops at the first loop where a rule says its
answer is stable, and the cost is the *mean* loops used. The rules:

* ``stable`` (patience m): the argmax at every labelled position is the same
  for m consecutive loop-to-loop transitions, i.e. loops ``n-m .. n`` agree;
  the sequence exits at loop n (so the earliest exit is loop ``m + 1``).
* ``kl`` (threshold τ): ``KL(p_n ‖ p_{n-1}) < τ`` at every labelled position
  (the largest KL over the sequence's positions decides); earliest exit: loop 2.

* ``entropy`` (threshold τ): the readout's entropy ``H(p_n) < τ`` at every labelled position
  (Huginn's entropy exit); earliest exit: loop 1.
* ``gate`` (quantile q): the learned exit gate's cumulative exit probability reaches q at every
  labelled position (``looped.training.halting``; q = 0.5 is PonderNet's median depth).
* ``gate_sample``: PonderNet's sampling at inference — the exit loop drawn from the gate's exit
  distribution, i.e. rule ``gate`` with a fresh q ~ U(0, 1) per sample.
* ``router_top_k``, ``router_causal`` (a model with a Mixture-of-Recursions router, ``looped.model.router``):
  no rule reads the loops' predictions; the router decided each token's depth inside the forward. A
  sample exits at the deepest loop any of its labelled tokens ran, with the trained L's answer: the top-k
  routing training used (it looks ahead) and the causal decisions decoding makes (``routed_exits``).

A sequence that never settles runs to ``max_loops``. Exiting at loop n costs n
loops: the rule reads loop n's own prediction, which the exit then returns.

Everything comes from ONE forward pass with ``return_loop_states=True``
(``looped.evaluation.loop_readout.per_loop_predictions``): every loop's readout at the labelled
positions, from which the exit loop of every sample under every rule is found without
running the model again. Each rule is the one decoding applies (``looped.decoding.exit_rules``), run over
every loop's signal (``exit_loops``); this module finds the signals. Only ``[n m]``
summaries are kept per loop, never ``[n m v]`` distributions.

Dimension letters: n loop, b sample, m labelled position (over the whole batch), v vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from looped.contract import IGNORE
from looped.decoding.exit_rules import ExitRule, exit_loops
from looped.evaluation.loop_readout import LoopPredictions, per_sample_all, per_sample_max


def first_exit(settled: Tensor, patience: int) -> Tensor:
    """``[b]`` 1-based exit loop from ``settled [n-1 b]`` (transition into loop j+2 settled): the first loop that
    ends ``patience`` consecutive settled transitions, the last loop, n, when none does (rule ``stable``)."""
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    unchanged = torch.cat([settled.new_zeros(1, settled.shape[1]), settled])  # loop 1 has no previous loop
    return exit_loops(ExitRule("stable", patience), unchanged)


def exit_loops_stable(pred: LoopPredictions, patience: int) -> Tensor:
    """``[b]`` exit loop under rule ``stable``: argmax unchanged for ``patience`` consecutive loops."""
    return first_exit(per_sample_all(pred.preds[1:] == pred.preds[:-1], pred.sample, pred.batch_size), patience)


def exit_loops_kl(pred: LoopPredictions, threshold: float) -> Tensor:
    """``[b]`` exit loop under rule ``kl``: ``KL(p_n ‖ p_{n-1}) < threshold`` at every labelled position."""
    return exit_loops(ExitRule("kl", threshold), per_sample_max(pred.kl, pred.sample, pred.batch_size))


def exit_loops_entropy(pred: LoopPredictions, threshold: float) -> Tensor:
    """``[b]`` exit loop under rule ``entropy``: ``H(p_n) < threshold`` at every labelled position (Huginn)."""
    return exit_loops(ExitRule("entropy", threshold), per_sample_max(pred.entropy, pred.sample, pred.batch_size))


def sample_exit_cdf(pred: LoopPredictions) -> Tensor:
    """``[n b]`` the learned cumulative exit probability after each loop, the least over each sample's labelled
    positions (so a threshold on it holds at every one of them)."""
    if pred.exit_cdf is None:
        raise ValueError("the gate rules need a model with a learned exit gate (LoopedConfig.exit_gate)")
    return -per_sample_max(-pred.exit_cdf, pred.sample, pred.batch_size)


def exit_loops_gate(pred: LoopPredictions, quantile: float) -> Tensor:
    """``[b]`` exit loop under rule ``gate``: the learned cumulative exit probability reaches ``quantile``
    at every labelled position (0.5: PonderNet's median depth)."""
    return exit_loops(ExitRule("gate", quantile), sample_exit_cdf(pred))


def exit_loops_gate_sample(pred: LoopPredictions, generator: torch.Generator | None = None) -> Tensor:
    """``[b]`` exit loop drawn from the learned exit distribution (PonderNet's sampling): rule ``gate`` with a
    fresh ``u ~ U(0, 1)`` per sample in place of the quantile."""
    cdf = sample_exit_cdf(pred)
    u = torch.rand(pred.batch_size, generator=generator, dtype=torch.float64).to(cdf.device, cdf.dtype)
    return exit_loops(ExitRule("gate", 0.0), cdf - u)  # cdf ≥ u, the rule's own comparison


def correct_at_exit(pred: LoopPredictions, exits: Tensor) -> Tensor:
    """``[b]`` bool: sample b's prediction at its exit loop is fully right."""
    return pred.correct.gather(0, (exits - 1)[None]).squeeze(0)


def rule_name(rule: str, param: float) -> str:
    return f"{rule}_{param:g}"


def adaptive_exits(
    pred: LoopPredictions,
    patience: Iterable[int],
    kl_thresholds: Iterable[float],
    entropy_thresholds: Iterable[float] = (),
    gate_quantiles: Iterable[float] = (),
    gate_sample: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """``{"stable_2": exits [b], "kl_0.01": exits [b], "entropy_0.5": ..., "gate_0.5": ...}`` for every rule,
    and ``"gate_sample"`` drawn with ``gate_sample`` when it is given."""
    exits = {rule_name("stable", m): exit_loops_stable(pred, m) for m in patience}
    exits.update({rule_name("kl", t): exit_loops_kl(pred, t) for t in kl_thresholds})
    exits.update({rule_name("entropy", t): exit_loops_entropy(pred, t) for t in entropy_thresholds})
    exits.update({rule_name("gate", q): exit_loops_gate(pred, q) for q in gate_quantiles})
    if gate_sample is not None:
        exits["gate_sample"] = exit_loops_gate_sample(pred, gate_sample)
    return exits


class Point(NamedTuple):
    """One operating point: a rule at one parameter (or a fixed loop count) and what it achieves."""

    name: str
    mean_loops: float
    accuracy: float


def pareto(points: Iterable[Point]) -> list[Point]:
    """The points no other point beats: none has fewer or equal mean loops and higher or equal
    accuracy, with one of the two strictly better. Sorted by mean loops."""
    points = list(points)

    def beats(q: Point, p: Point) -> bool:
        no_worse = q.mean_loops <= p.mean_loops and q.accuracy >= p.accuracy
        return no_worse and (q.mean_loops < p.mean_loops or q.accuracy > p.accuracy)

    front = [p for p in points if not any(beats(q, p) for q in points)]
    return sorted(front, key=lambda p: (p.mean_loops, -p.accuracy))


def format_adaptive_table(fixed: list[float], adaptive: list[Point], trained_loops: int) -> str:
    """Plain-text table: fixed loop counts, then every adaptive rule; ``*`` marks the Pareto front."""
    fixed_points = [Point(f"fixed_{n}", float(n), a) for n, a in enumerate(fixed, start=1)]
    front = set(pareto(fixed_points + adaptive))
    lines = [f"\nAdaptive exit at test (max {len(fixed)} loops, trained L={trained_loops}; * = on the Pareto front)"]
    lines.append(f"  {'rule':<14} {'mean loops':>10} {'acc %':>7}")
    for p in fixed_points + adaptive:
        lines.append(f"  {p.name:<14} {p.mean_loops:>10.2f} {100 * p.accuracy:>7.1f} {'*' if p in front else ''}")
    return "\n".join(lines)


ROUTER_RULES = ("router_top_k", "router_causal")


def routed_exits(model, input_ids: Tensor, labels: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """``{rule: (right [b], loops [b])}`` for ``ROUTER_RULES``: one forward at the trained L per routing; a sample
    is right when every labelled position is, and used the most loops any of its labelled tokens ran."""
    labelled = labels != IGNORE
    exits = {}
    for rule in ROUTER_RULES:
        with model.router.deciding(rule.removeprefix("router_")):
            logits = model(input_ids)
        right = ((logits.argmax(-1) == labels) | ~labelled).all(-1)
        exits[rule] = right, model.router.depths.masked_fill(~labelled, 0).amax(-1)
    return exits
