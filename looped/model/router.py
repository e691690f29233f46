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

Run past the trained L (``forward(loops=...)``, evaluation's extra loops), expert-choice reuses its last
loop's router and capacity, and a token-choice token of depth L takes every further loop.

``Routing`` is one forward's state (what is active, the losses so far); ``LoopedTransformer.loop_step``
asks it for a ``Selection`` per loop, runs the block on the gathered tokens and scatters them back.

Dimension letters: b batch, t time, m tokens a loop runs on, d model width, n loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from looped.model.cache import DecodeCache
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
        self.first_loop_runs_all = config.kv_sharing
        """``kv_sharing``: every later loop attends to loop 1's keys, so loop 1 runs every token (expert-choice's
        first capacity is 1.0, checked by ``LoopedConfig``; the causal rule keeps every token there too)."""
        self.warmup_steps = config.router_warmup_steps
        self.aux_weight, self.z_weight = config.router_aux_weight, config.router_z_weight
        self.step = 0
        """The training step (``LoopedLM`` sets it), for the capacity warm-up."""
        self.decide = "top_k"
        """Expert-choice: ``top_k`` as trained (looks ahead), or ``causal`` (each token's own logit > 0, as
        decoding must; ``deciding``). Token-choice's up-front depths are causal either way."""
        self.weighted = True
        """Weight a kept token's update by its router score (False: by 1, the plain block's update)."""
        self.losses: dict[str, Tensor] = {}
        """The last forward's auxiliary and z-losses (means over its loops), unweighted."""
        self.disagreement: Tensor | None = None
        """Expert-choice, the last top-k forward's ``[loops]``: per loop, the share of the tokens it scored whose
        causal decision (the learning router's logit > 0) differs from top-k membership, on the same states."""
        self.tokens_per_loop: list[int] = []
        """The last forward's tokens per row that each loop ran on (ragged rows: the longest row's)."""
        self.depths: Tensor | None = None
        """The last forward's ``[b t]``: how many loops each token ran (its depth; 0: routed past every loop)."""

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

    @contextmanager
    def deciding(self, decide: str) -> Iterator[None]:
        """Route by ``decide`` (``top_k`` or ``causal``) inside the block, as before after it."""
        if decide not in ("top_k", "causal"):
            raise ValueError(f"a router decides by top_k or causal, not {decide!r}")
        before, self.decide = self.decide, decide
        try:
            yield
        finally:
            self.decide = before

    def begin(self, padding: Padding | None, loops: int, cache: DecodeCache | None = None) -> Routing:
        """One forward's ``Routing`` (``cache``: decoding, which must not look ahead)."""
        if cache is not None and self.kind == "expert_choice" and self.decide != "causal":
            raise ValueError(
                "expert-choice routing takes the top-k of a whole sequence, which decoding has not seen yet; "
                "decode with generate(exit='router'), its causal router's own decisions"
            )
        self.losses = {}
        return Routing(self, padding, loops, cache)


@dataclass
class Selection:
    """The tokens one loop runs on.

    Gathered (a forward without a cache): ``index`` ``[b m]`` their positions in causal order (``t``, one
    past the end, for a row's unused places when rows keep different counts; ``valid`` False there).
    Masked (decoding with a cache, whose slots are bound to positions): ``keep`` ``[b t]``; every new token
    runs, the others' updates are dropped and their keys are hidden from this loop (``padding``). A decoding
    step of one token per row runs only the ``rows`` whose token is routed to the loop (the others skip it).
    ``weight``: the kept tokens' update weights, ``[b m]`` or ``[b t]``.
    """

    index: Tensor | None
    valid: Tensor | None
    weight: Tensor
    padding: Padding | None
    keep: Tensor | None = None
    rows: Tensor | None = None
    inputs: Tensor | None = None

    def gather(self, x: Tensor) -> Tensor:
        """``[b m d]`` the selected tokens of ``x`` ``[b t d]`` (all of them when masked; a step's routed rows)."""
        if self.rows is not None:
            self.inputs = x[self.rows]
        else:
            self.inputs = x if self.index is None else take(x, self.index, self.valid is not None)
        return self.inputs

    def narrow(self, step):
        """The loop step for the selected tokens: their loop input, their positions and padding (and, with
        ``kv_sharing``, loop 1's keys of every position for them to attend to)."""
        if step.rows is not None:
            raise ValueError("a routed loop step runs every row of a forward, not a row subset")
        for shared in step.shared or []:
            shared.routed = True
        if self.rows is not None:  # the rows loop_step runs: their slots and shared keys narrowed by the step
            loop_input = None if step.loop_input is None else step.loop_input[self.rows]
            return replace(step, loop_input=loop_input, padding=self.padding.rows(self.rows), rows=self.rows)
        if self.index is None:
            return replace(step, padding=self.padding)
        if step.slots is not None:
            raise ValueError("a gathered routed loop cannot extend a decode cache: decode through Routing's masks")
        loop_input = None if step.loop_input is None else take(step.loop_input, self.index, self.valid is not None)
        return replace(step, loop_input=loop_input, padding=self.padding)

    def scatter(self, x: Tensor, out: Tensor) -> Tensor:
        """``x`` with the selected tokens moved by their weighted update ``out − inputs``."""
        w = self.weight[..., None].to(out.dtype)
        if self.rows is not None:
            return x.index_copy(0, self.rows, self.inputs + w[self.rows] * (out - self.inputs))
        new = self.inputs + w * (out - self.inputs)
        if self.index is None:
            return torch.where(self.keep[..., None], new, x)
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


def compact(keep: Tensor) -> tuple[Tensor, Tensor | None]:
    """``keep`` ``[b t]`` as gathered positions ``[b m]`` in causal order (``m`` the largest row's count; ``t`` in a
    shorter row's unused places) and which are real (None when every row keeps every place it has)."""
    t = keep.shape[1]
    m = max(1, int(keep.sum(-1).max()))
    order = torch.arange(t, device=keep.device).expand_as(keep)
    index = torch.where(keep, order, t + order).sort(-1).values[:, :m]  # kept positions first, in order
    valid = index < t
    return torch.where(valid, index, t), None if bool(valid.all()) else valid


class Routing:
    """One forward's routing: the tokens still active, the losses so far (see the module doc).

    ``causal`` (``Router.decide == "causal"``): every decision reads only the token's own state, so the forward
    never looks ahead — expert-choice keeps a still-active token when its learning router's logit is > 0
    (sigmoid > 0.5, the threshold the auxiliary loss trained), token-choice as in training. With a ``cache``
    (decoding) each loop's slots hold keys only of the positions routed to it (``DecodeCache.routed``).
    """

    def __init__(self, router: Router, padding: Padding | None, loops: int, cache: DecodeCache | None = None) -> None:
        self.router, self.padding, self.loops, self.cache = router, padding, loops, cache
        self.causal = router.decide == "causal"
        self.active: Tensor | None = None  # top-k: [b m] positions still active (None: all)
        self.alive: Tensor | None = None  # causal expert-choice: [b t] still active
        self.depth: Tensor | None = None  # token-choice: [b t] each token's depth
        self.gate: Tensor | None = None  # token-choice: [b t] the probability of that depth
        self.aux: list[Tensor] = []
        self.z: list[Tensor] = []
        self.kept: list[Tensor] = []
        """Per loop, ``[b t]`` bool: the tokens it ran on."""
        self.disagreement: list[Tensor] = []
        """Top-k expert-choice, per loop: the share of candidates whose causal decision (logit > 0) differs
        from top-k membership, on the same states."""

    def select(self, x: Tensor, loop: int) -> Selection:
        """The tokens loop ``loop`` runs on, from the state ``x`` ``[b t d]`` entering it."""
        if self.router.kind == "expert_choice" and not self.causal:
            selection = self.top_k(x, loop)
        else:
            keep, weight = self.causal_choice(x, loop) if self.router.kind == "expert_choice" else self.depths(x, loop)
            selection = self.masked(keep, weight, loop) if self.cache is not None else self.gathered(keep, weight)
        ran = selection.weight.shape[1]  # the tokens per row the block runs on (one at least, even if none is kept)
        self.router.tokens_per_loop = self.router.tokens_per_loop[: loop - 1] + [ran]
        if loop == self.loops and self.aux:  # the losses of the whole forward: means over its loops
            self.router.losses = {"aux": torch.stack(self.aux).mean(), "z": torch.stack(self.z).mean()}
        if loop == self.loops:
            self.router.depths = torch.stack(self.kept).sum(0)
        if loop == self.loops and self.disagreement:
            self.router.disagreement = torch.stack(self.disagreement)
        return selection

    def top_k(self, x: Tensor, loop: int) -> Selection:
        """Expert-choice in training: each row's top ``ceil(c_n · t)`` of the tokens still active."""
        router = self.router
        active = self.active
        candidates = x if active is None else take(x, active, False)  # [b m d]
        n = min(loop, router.loops) - 1  # past the trained L (evaluation's extra loops): the last loop's router
        logits = router.score[n](candidates).squeeze(-1).float()  # [b m]
        t, m = x.shape[1], candidates.shape[1]
        k = min(m, max(1, math.ceil(router.capacities()[n] * t)))
        top = logits.topk(k, dim=-1).indices.sort(dim=-1).values  # [b k] into the candidates, causal order
        index = top if active is None else active.gather(1, top)
        member = torch.zeros_like(logits).scatter(1, top, 1.0)
        learner = logits
        if router.causal is not None:  # a second router learns the decision from states it cannot change
            learner = router.causal[n](candidates.detach()).squeeze(-1).float()
        self.aux.append(F.binary_cross_entropy_with_logits(learner, member))
        self.z.append(logits.square().mean())  # log-sum-exp of one logit is the logit
        self.disagreement.append(((learner > 0) != member.bool()).float().mean().detach())
        self.active = index
        self.kept.append(torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device).scatter(1, index, True))
        weight = torch.sigmoid(logits.gather(1, top)) if router.weighted else torch.ones_like(top, dtype=x.dtype)
        return Selection(index, None, weight, self.gathered_padding(index, None))

    def causal_choice(self, x: Tensor, loop: int) -> tuple[Tensor, Tensor]:
        """Expert-choice without looking ahead: a still-active token goes on when its learning router says so."""
        router = self.router
        n = min(loop, router.loops) - 1  # past the trained L: the last loop's router
        logits = router.score[n](x).squeeze(-1).float()  # [b t]
        learner = logits if router.causal is None else router.causal[n](x).squeeze(-1).float()
        keep = learner > 0 if self.alive is None else self.alive & (learner > 0)
        if loop == 1 and router.first_loop_runs_all:
            keep = torch.ones_like(keep)
        self.alive = keep
        return keep, torch.sigmoid(logits)

    def depths(self, x: Tensor, loop: int) -> tuple[Tensor, Tensor]:
        """Token-choice: every token's depth from its state entering loop 1; loop n runs those of depth >= n."""
        router = self.router
        if self.depth is None:  # loop 1: every token's depth, once
            logits = router.score(x).float()  # [b t L]
            probs = logits.softmax(-1)
            choice = probs.argmax(-1)  # [b t]
            self.depth, self.gate = choice + 1, probs.gather(-1, choice[..., None]).squeeze(-1)
            share = F.one_hot(choice, router.loops).float().flatten(0, 1).mean(0)  # f_j: tokens given depth j
            self.aux.append(router.loops * (share * probs.flatten(0, 1).mean(0)).sum())  # Switch's balancing loss
            self.z.append(torch.logsumexp(logits, -1).square().mean())
        return self.depth >= min(loop, router.loops), self.gate  # depth L: every loop there is (L or more)

    def gathered(self, keep: Tensor, weight: Tensor) -> Selection:
        self.kept.append(keep)
        index, valid = compact(keep)
        w = torch.cat([weight, weight[:, :1]], 1).gather(1, index) if self.router.weighted else None
        w = torch.ones_like(index, dtype=torch.float) if w is None else w
        return Selection(index, valid, w, self.gathered_padding(index, valid))

    def masked(self, keep: Tensor, weight: Tensor, loop: int) -> Selection:
        """Decoding: every new token runs loop ``loop``; only the kept ones' updates and keys count."""
        self.kept.append(keep)
        cache = self.cache
        b, t = keep.shape
        end = cache.length + t
        if cache.routed is None:
            cache.routed = torch.zeros(self.loops, b, cache.capacity, dtype=torch.bool, device=keep.device)
        cache.routed[loop - 1, :, cache.length : end] = keep
        # Recursion-wise: loop n's keys are its own tokens'; with kv_sharing, loop 1's (every token's).
        keys = cache.routed[0 if self.router.first_loop_runs_all else loop - 1, :, :end]
        if self.padding is None:
            positions = torch.arange(end, device=keep.device).expand(b, end)
        else:
            positions, keys = self.padding.positions, keys & self.padding.keys
        w = weight if self.router.weighted else torch.ones_like(weight)
        rows = keep[:, 0].nonzero().squeeze(1) if t == 1 else None  # a decoding step: only the routed rows run
        return Selection(None, None, w, Padding.gathered(positions, keys), keep=keep, rows=rows)

    def gathered_padding(self, index: Tensor, valid: Tensor | None) -> Padding:
        """The gathered tokens' positions (among their row's tokens) and which of them are real."""
        if self.padding is None:
            return Padding.gathered(index if valid is None else torch.where(valid, index, 0), valid)
        spare = torch.cat([self.padding.positions, self.padding.positions[:, :1]], 1)
        real = torch.cat([self.padding.keys, torch.zeros_like(self.padding.keys[:, :1])], 1).gather(1, index)
        return Padding.gathered(spare.gather(1, index), real if valid is None else real & valid)


class RowRouting:
    """Causal routing when every row decodes its own token at its own loop (depth-wise decoding,
    ``looped.decoding.depthwise``): before loop ``n[r]`` of row r's token, whether the token runs it and the weight
    of its update — the decisions ``Routing`` makes with ``Router.decide == "causal"``, row by row."""

    def __init__(self, router: Router, batch: int, device: torch.device) -> None:
        self.router = router
        self.depth = torch.zeros(batch, dtype=torch.long, device=device)  # token-choice: each row's token's depth
        self.gate = torch.zeros(batch, device=device)  # token-choice: the probability of that depth

    def decide(self, x: Tensor, loop: Tensor) -> tuple[Tensor, Tensor]:
        """``(keep [b], weight [b])`` for each row's token ``x`` ``[b 1 d]`` entering its loop ``loop`` ``[b]``."""
        router, h = self.router, x[:, -1]
        n = loop.clamp(max=router.loops) - 1  # past the trained L: the last loop's router
        if router.kind == "expert_choice":  # a row at loop n ran loops 1..n-1: it is still active

            def at_loop(scorers: nn.ModuleList) -> Tensor:
                return torch.cat([s(h) for s in scorers], -1).float().gather(1, n[:, None]).squeeze(1)

            logits = at_loop(router.score)
            learner = logits if router.causal is None else at_loop(router.causal)
            keep = (learner > 0) | ((loop == 1) & router.first_loop_runs_all)
            return keep, torch.sigmoid(logits)
        first = loop == 1
        if bool(first.any()):  # a new token: its depth, once, from its state entering loop 1
            probs = router.score(h[first]).float().softmax(-1)
            choice = probs.argmax(-1)
            self.depth[first], self.gate[first] = choice + 1, probs.gather(-1, choice[:, None]).squeeze(-1)
        return self.depth >= n + 1, self.gate
