"""Mixture-of-Recursions routers (Bae et al. 2025): which tokens the shared block runs on, loop by loop.

A router makes training cheaper, not only decoding: at every loop the block runs on the tokens routed
to it, gathered into a shorter sequence in causal order (each at its own position, so RoPE and causal
attention see them where they are), and the result is scattered back; the tokens left out keep their
state. A loop costs what its tokens cost.

* ``expert_choice`` — before loop n a per-loop linear router scores the tokens still active and every
  row keeps its top ``k_n = ceil(c_n · t)`` (``LoopedConfig.capacity_schedule``, warmed up from 1 over
  ``router_warmup_steps``). Top-k over a sequence looks ahead, so an auxiliary loss teaches a causal
  decision: BCE of the router's logits against top-k membership (``bce``), or of a second router that
  reads detached states (``stop_grad``); its sigmoid > 0.5 is what decoding can use.
* ``token_choice`` — one router gives every token its depth up front (the argmax of a softmax over
  1..L); a token runs loops 1..depth. Switch's balancing loss keeps the depths spread.

A kept token's update is weighted by its router score: ``x + w · (block(x) − x)``, ``w`` the sigmoid of
its logit (expert-choice) or the softmax probability of its depth (token-choice), which is how the
router's choice gets a gradient. Both add a z-loss (the squared log-sum-exp of the logits).

``Routing`` is one forward's state (what is active, the losses so far); ``LoopedTransformer.loop_step``
asks it for a ``Selection`` per loop, runs the block on the gathered tokens and scatters them back.

Dimension letters: b batch, t time, m tokens a loop runs on, d model width, n loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from looped.model.config import LoopedConfig
from looped.model.mixers import Padding


class Router(nn.Module):
    """The router's weights and settings (``LoopedConfig.router``); ``begin`` starts one forward's ``Routing``."""

    def __init__(self, config: LoopedConfig) -> None:
        super().__init__()
        self.kind = config.router
        self.loops = config.loops
        d = config.d_model
        if self.kind == "expert_choice":
            self.score = nn.ModuleList(nn.Linear(d, 1) for _ in range(config.loops))  # one router per loop
            stop_grad = config.router_aux_loss == "stop_grad"
            self.causal = nn.ModuleList(nn.Linear(d, 1) for _ in range(config.loops)) if stop_grad else None
        else:
            self.score = nn.Linear(d, config.loops)  # a logit per depth 1..L
            self.causal = None
        self.schedule = config.capacity_schedule
        self.warmup_steps = config.router_warmup_steps
        self.aux_weight, self.z_weight = config.router_aux_weight, config.router_z_weight
        self.step = 0
        """The training step (``LoopedLM`` sets it), for the capacity warm-up."""
        self.weighted = True
        """Weight a kept token's update by its router score (False: by 1, the plain block's update)."""
        self.losses: dict[str, Tensor] = {}
        """The last forward's auxiliary and z-losses (means over its loops), unweighted."""
        self.tokens_per_loop: list[int] = []
        """The last forward's tokens per sequence that each loop ran on (ragged rows: the longest row's)."""

    def capacities(self) -> list[float]:
        """Each loop's capacity now: warmed up linearly from 1 while training, the schedule's otherwise."""
        if not self.training or self.step >= self.warmup_steps:
            return self.schedule
        done = self.step / self.warmup_steps
        return [1.0 - (1.0 - c) * done for c in self.schedule]

    def loss(self) -> Tensor | float:
        """The weighted auxiliary and z-losses of the last forward, for the training loss."""
        if not self.losses:
            return 0.0
        return self.aux_weight * self.losses["aux"] + self.z_weight * self.losses["z"]

    def begin(self, padding: Padding | None, loops: int) -> Routing:
        if loops > self.loops:
            raise ValueError(
                f"a router trained for loops={self.loops} has no decision for loop {loops}; run at most {self.loops}"
            )
        self.losses = {}
        return Routing(self, padding, loops)


@dataclass
class Selection:
    """The tokens one loop runs on: ``index`` ``[b m]`` positions in causal order (``t``, one past the end, for a
    row's unused places when rows keep different counts, ``valid`` False there), their update weights."""

    index: Tensor
    valid: Tensor | None
    weight: Tensor
    padding: Padding | None
    inputs: Tensor | None = None

    def gather(self, x: Tensor) -> Tensor:
        """``[b m d]`` the selected tokens of ``x`` ``[b t d]`` (of the extended ``x`` when rows are ragged)."""
        self.inputs = take(x, self.index, self.valid is not None)
        return self.inputs

    def narrow(self, step):
        """The loop step for the gathered tokens: their loop input, their positions and padding."""
        if step.slots is not None or step.shared is not None or step.rows is not None:
            raise ValueError("a routed loop step runs a whole forward: no decode cache, KV sharing or row subset")
        loop_input = None if step.loop_input is None else take(step.loop_input, self.index, self.valid is not None)
        return replace(step, loop_input=loop_input, padding=self.padding)

    def scatter(self, x: Tensor, out: Tensor) -> Tensor:
        """``x`` with the selected tokens moved by their weighted update ``out − inputs``."""
        w = self.weight[..., None].to(out.dtype)
        new = self.inputs + w * (out - self.inputs)
        ragged = self.valid is not None
        base = torch.cat([x, x[:, :1]], dim=1) if ragged else x  # one spare column for the unused places
        index = self.index[..., None].expand(-1, -1, x.shape[-1])
        result = base.scatter(1, index, new)
        return result[:, :-1] if ragged else result


def take(x: Tensor, index: Tensor, ragged: bool) -> Tensor:
    """``x[b, index[b]]``; with ``ragged`` the index may point one past the end (a zero row)."""
    if ragged:
        x = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class Routing:
    """One forward's routing: the tokens still active, the losses so far (see the module doc)."""

    def __init__(self, router: Router, padding: Padding | None, loops: int) -> None:
        self.router, self.padding, self.loops = router, padding, loops
        self.active: Tensor | None = None  # expert-choice: [b m] positions still active (None: all)
        self.depth: Tensor | None = None  # token-choice: [b t] each token's depth
        self.gate: Tensor | None = None  # token-choice: [b t] the probability of that depth
        self.aux: list[Tensor] = []
        self.z: list[Tensor] = []
        self.kept: list[Tensor] = []
        """Per loop, ``[b m]`` the positions it ran on (what a test or a FLOP count reads)."""

    def select(self, x: Tensor, loop: int) -> Selection:
        """The tokens loop ``loop`` runs on, from the state ``x`` ``[b t d]`` entering it."""
        if self.router.kind == "expert_choice":
            selection = self.expert_choice(x, loop)
        else:
            selection = self.token_choice(x, loop)
        self.kept.append(selection.index)
        self.router.tokens_per_loop = [index.shape[1] for index in self.kept]
        if loop == self.loops:  # the losses of the whole forward: means over its loops
            self.router.losses = {"aux": torch.stack(self.aux).mean(), "z": torch.stack(self.z).mean()}
        return selection

    def expert_choice(self, x: Tensor, loop: int) -> Selection:
        router = self.router
        active = self.active
        candidates = x if active is None else take(x, active, False)  # [b m d]
        logits = router.score[loop - 1](candidates).squeeze(-1).float()  # [b m]
        t, m = x.shape[1], candidates.shape[1]
        k = min(m, max(1, math.ceil(router.capacities()[loop - 1] * t)))
        top = logits.topk(k, dim=-1).indices.sort(dim=-1).values  # [b k] into the candidates, causal order
        index = top if active is None else active.gather(1, top)
        member = torch.zeros_like(logits).scatter(1, top, 1.0)
        if router.causal is None:
            self.aux.append(F.binary_cross_entropy_with_logits(logits, member))
        else:  # a second router learns the decision from states it cannot change
            causal = router.causal[loop - 1](candidates.detach()).squeeze(-1).float()
            self.aux.append(F.binary_cross_entropy_with_logits(causal, member))
        self.z.append(logits.square().mean())  # log-sum-exp of one logit is the logit
        self.active = index
        weight = torch.sigmoid(logits.gather(1, top)) if router.weighted else torch.ones_like(top, dtype=x.dtype)
        return Selection(index, None, weight, self.gathered_padding(index, None))

    def token_choice(self, x: Tensor, loop: int) -> Selection:
        router = self.router
        if self.depth is None:  # loop 1: every token's depth, once
            logits = router.score(x).float()  # [b t L]
            probs = logits.softmax(-1)
            choice = probs.argmax(-1)  # [b t]
            self.depth, self.gate = choice + 1, probs.gather(-1, choice[..., None]).squeeze(-1)
            share = F.one_hot(choice, router.loops).float().flatten(0, 1).mean(0)  # f_j: tokens given depth j
            self.aux.append(router.loops * (share * probs.flatten(0, 1).mean(0)).sum())  # Switch's balancing loss
            self.z.append(torch.logsumexp(logits, -1).square().mean())
        t = x.shape[1]
        active = self.depth >= loop  # [b t]
        m = max(1, int(active.sum(-1).max()))
        order = torch.arange(t, device=x.device).expand_as(active)
        index = torch.where(active, order, t + order).sort(-1).values[:, :m]  # active positions first, in order
        valid = index < t
        index = torch.where(valid, index, t)
        if router.weighted:
            weight = torch.cat([self.gate, self.gate[:, :1]], 1).gather(1, index).to(x.dtype)
        else:
            weight = torch.ones_like(index, dtype=x.dtype)
        return Selection(index, valid, weight, self.gathered_padding(index, valid))

    def gathered_padding(self, index: Tensor, valid: Tensor | None) -> Padding:
        """The gathered tokens' positions (among their row's tokens) and which of them are real."""
        if self.padding is None:
            return Padding.gathered(index if valid is None else torch.where(valid, index, 0), valid)
        spare = torch.cat([self.padding.positions, self.padding.positions[:, :1]], 1)
        real = torch.cat([self.padding.keys, torch.zeros_like(self.padding.keys[:, :1])], 1).gather(1, index)
        return Padding.gathered(spare.gather(1, index), real if valid is None else real & valid)
