"""Learned exits: the objectives that train a looped model's halting gate.

A model built with ``LoopedConfig(exit_gate=True)`` gives every token, after every loop n = 1..N,
a halting probability ``λ_n = σ(gate(norm(h_n)))`` (``LoopedTransformer.halt_logits``). The
probability of exiting *at* loop n is the chance the token did not halt before and halts now:

    p(n) = λ_n · ∏_{j<n} (1 − λ_j)       for n < N,      p(N) = ∏_{j<N} (1 − λ_j)

(the mass left at the last loop run goes to it, so p sums to 1 for any N: training with random
loop counts works unchanged). With ``L_n`` the cross-entropy of the readout after loop n, every
objective is a weighted sum of the per-loop losses plus a term on the exit distribution, averaged
over the labelled tokens:

* ``ouro`` — Zhu et al. 2025, *Scaling Latent Reasoning via Looped Language Models* (Ouro/LoopLM):
  ``Σ_n p(n) L_n − β H(p)``, the expected loss under the exit distribution with an entropy bonus
  that keeps the gate from collapsing onto one depth early in training (β: ``beta``).
* ``pondernet`` — Banino et al. 2021, *PonderNet: Learning to Ponder*: ``Σ_n p(n) L_n + β KL(p ‖ q)``
  with the geometric prior ``q(n) ∝ λ_p (1 − λ_p)^{n−1}`` truncated to the N loops run and
  renormalised (λ_p: ``prior``; mean depth 1/λ_p).
* ``act`` — Graves 2016, *Adaptive Computation Time*: the token halts at the first loop
  ``N(t)`` whose cumulative ``Σ_{j≤n} λ_j`` reaches ``1 − ε`` (or at N); its weights are λ_n before
  it and the remainder ``R = 1 − Σ_{j<N(t)} λ_j`` at it, and the ponder cost ``τ (N(t) + R)`` is
  added. ACT mixes the *states* with these weights; here, as PonderNet compares it, they weight the
  per-loop *losses*, so all three share one interface (``R`` carries ACT's gradient to the gate).
  Its trap, measured on the quickstart (docs/evaluation.md): once λ_1 ≥ 1 − ε a token halts at loop 1
  with R = 1 whatever λ_1 is, so the gate gets no gradient there and never learns to go deeper; the
  ponder cost pushes every token towards it.
* ``ouro_stage2`` — Ouro's second stage (Zhu et al. 2025, §3.4, "focused adaptive gate training"): the
  language model is frozen (``LoopedLM`` leaves only the gate trainable; start it from a first-stage
  checkpoint with ``model.init_args.init_weights``) and the gate learns, per token, whether the next
  loop still helps. With the improvement ``I_n = max(0, L_n − L_{n+1})`` (no gradient) and the ideal
  continuation probability ``w_n = σ(k (I_n − γ))``, the gate's loss is the binary cross-entropy
  ``−[w_n log(1 − λ_n) + (1 − w_n) log λ_n]``, averaged over loops n = 1..N−1 (the last loop run has no
  next one to judge) — stop where one more loop would gain less than about γ nats (k: ``k``, γ:
  ``gamma``; the paper uses 50 and 0.005).

At inference the gate's exit rule (``looped.evaluation.exits``, rule ``gate``) stops a sequence at the first
loop where the cumulative exit probability ``Σ_{j≤n} p(j)`` reaches q at every labelled position;
q = 0.5 is PonderNet's median depth.

Dimension letters: n loop, m labelled token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from looped.errors import InputError

OBJECTIVES = ("ouro", "pondernet", "act", "ouro_stage2")


@dataclass
class ExitObjective:
    """How ``LoopedLM`` trains the exit gate (recipe key ``model.init_args.exit``)."""

    objective: Literal["ouro", "pondernet", "act", "ouro_stage2"] = "ouro"
    """Which objective (module docstring): Ouro's entropy-regularised one, PonderNet's, ACT's, or Ouro's
    second stage (the gate alone, on the frozen model's per-loop loss improvement)."""
    beta: float = 0.01
    """β: weight of the entropy bonus (ouro) or of the KL to the prior (pondernet)."""
    prior: float = 0.5
    """λ_p: the geometric prior's halting probability per loop (pondernet)."""
    tau: float = 0.01
    """τ: weight of ACT's ponder cost N + R (act)."""
    epsilon: float = 0.01
    """ε: ACT halts once the cumulative halting probability reaches 1 − ε (act)."""
    k: float = 50.0
    """Slope of the ideal continuation probability σ(k (I − γ)) (ouro_stage2)."""
    gamma: float = 0.005
    """γ: the loss improvement, in nats, at which one more loop is worth it half the time (ouro_stage2)."""

    def __post_init__(self) -> None:
        key = "model.init_args.exit"
        if self.objective not in OBJECTIVES:
            raise InputError(f"{key}.objective: {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        for name in ("beta", "tau", "k", "gamma"):
            if getattr(self, name) < 0:
                raise InputError(f"{key}.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("prior", "epsilon"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise InputError(f"{key}.{name} must lie in (0, 1), got {getattr(self, name)}")

    def loss(self, token_losses: Tensor, halt_logits: Tensor) -> Tensor:
        """The objective from per-loop losses ``[n m]`` and the gate's halting logits ``[n m]``, mean over m."""
        token_losses, halt_logits = token_losses.float(), halt_logits.float()
        if self.objective == "ouro_stage2":
            return gate_bce_on_improvement(token_losses, halt_logits, self.k, self.gamma)
        if self.objective == "act":
            weights, ponder = act_weights(halt_logits, self.epsilon)
            return ((weights * token_losses).sum(0) + self.tau * ponder).mean()
        p = exit_distribution(halt_logits)
        expected = (p * token_losses).sum(0)
        logp = p.clamp_min(1e-12).log()
        if self.objective == "ouro":
            entropy = -(p * logp).sum(0)
            return (expected - self.beta * entropy).mean()
        log_prior = geometric_log_prior(self.prior, p.shape[0], p.device)[:, None]
        kl = (p * (logp - log_prior)).sum(0)
        return (expected + self.beta * kl).mean()

    @property
    def trains_only_the_gate(self) -> bool:
        """The objective's second stage freezes the language model (``LoopedLM`` trains the gate alone)."""
        return self.objective == "ouro_stage2"


def gate_bce_on_improvement(token_losses: Tensor, halt_logits: Tensor, k: float, gamma: float) -> Tensor:
    """Ouro's stage-2 gate loss (module docstring) from per-loop losses and halting logits ``[n m]``."""
    if token_losses.shape[0] < 2:
        return halt_logits.sum() * 0.0  # one loop run: nothing to judge, but keep the graph
    improvement = (token_losses[:-1] - token_losses[1:]).detach().clamp_min(0.0)
    go_on = torch.sigmoid(k * (improvement - gamma))  # w_n: the next loop is worth running
    return F.binary_cross_entropy_with_logits(halt_logits[:-1], 1.0 - go_on)


def exit_distribution(halt_logits: Tensor) -> Tensor:
    """``p(n)`` ``[n ...]`` from halting logits ``[n ...]``; the last loop run takes the remaining mass."""
    log_halt, log_stay = F.logsigmoid(halt_logits), F.logsigmoid(-halt_logits)
    # log ∏_{j<n} (1 − λ_j): zero for the first loop, then the running sum of log(1 − λ).
    survive = torch.cat([torch.zeros_like(log_stay[:1]), log_stay[:-1].cumsum(0)])
    log_p = survive + torch.cat([log_halt[:-1], torch.zeros_like(log_halt[-1:])])
    return log_p.exp()


def geometric_log_prior(prior: float, loops: int, device=None) -> Tensor:
    """``log q(n)`` ``[loops]``: ``q(n) ∝ λ_p (1 − λ_p)^{n−1}`` for n = 1..loops, renormalised."""
    n = torch.arange(loops, device=device, dtype=torch.float32)
    log_q = n * torch.log1p(torch.tensor(-prior, device=device)) + torch.log(torch.tensor(prior, device=device))
    return log_q - torch.logsumexp(log_q, 0)


def act_weights(halt_logits: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """ACT's loss weights ``[n m]`` (λ_n before the halting loop, R at it) and ponder cost N + R ``[m]``."""
    lam = torch.sigmoid(halt_logits)
    loops = lam.shape[0]
    cumulative = lam.cumsum(0)
    reached = cumulative >= 1 - epsilon
    reached[-1] = True  # the last loop run halts every token that has not halted yet
    halt_at = reached.float().argmax(0)  # 0-based N(t) − 1: the first loop that reaches 1 − ε
    index = torch.arange(loops, device=lam.device)[:, None]
    before = index < halt_at
    remainder = 1 - (lam * before).sum(0)  # R = 1 − Σ_{j<N(t)} λ_j
    weights = torch.where(before, lam, torch.zeros_like(lam))
    weights = weights + torch.where(index == halt_at, remainder, torch.zeros_like(remainder))
    return weights, (halt_at + 1).float() + remainder


def expected_loops(halt_logits: Tensor) -> Tensor:
    """Mean over tokens of ``Σ_n n p(n)``: the depth the gate would spend on average."""
    p = exit_distribution(halt_logits.float())
    n = torch.arange(1, p.shape[0] + 1, device=p.device, dtype=p.dtype).view(-1, *([1] * (p.dim() - 1)))
    return (n * p).sum(0).mean()
