"""Per-token depth in decoding: every new token stops looping at its own loop, and stopped rows cost nothing.

``LoopedTransformer.generate(prompt, n, exit="entropy_0.5")`` decodes like ``generate`` but decides,
after every loop of every new token, whether that token has looped enough. The rules are
``looped.adaptive``'s, decided online from what the loops so far predict:

=============  ==================================================================  =================
rule           a token stops after loop n when                                     reads per loop
=============  ==================================================================  =================
``fixed``      never early: n = max loops (``generate`` without ``exit``)          nothing
``entropy_τ``  the prediction's entropy ``H(p_n) < τ`` (Huginn)                    the readout
``kl_τ``       ``KL(p_n ‖ p_{n−1}) < τ``, n ≥ 2                                    the readout
``stable_m``   the argmax is unchanged over the last m loops, n ≥ m + 1            the readout
``gate_q``     the learned gate's cumulative exit probability reaches q (Ouro)     the gate (d → 1)
=============  ==================================================================  =================

A rule that reads the prediction runs the readout (coda, norm, head) after every loop of every
still-looping token: with a vocabulary much wider than the model that costs more than a layer, so
the gate rule is the one that saves the most compute.

**Stopped rows are not computed.** Two schedules, the same tokens. ``synchronous`` (the default,
``AdaptiveDecoder`` here): the rows still looping on a token run as a sub-batch; after each loop the
rows whose token stopped leave it (their activations are dropped, their cache slots read through
``RowSlot`` views of the rows left), so a loop costs what its remaining rows cost, and a token as
many loops as its deepest row. ``depthwise`` (``looped.depthwise``): a row whose token stopped
starts its next one at once, every application of the block runs the whole batch, each row at its
own loop, so the batch costs its busiest row's sum of loops. Which is faster depends on how evenly
the rows' depths spread (``docs/benchmarks.md``: on this project's CPU, synchronous).

**What a skipped layer application leaves in the cache.** A later token, at its loop n, attends
to every earlier position's keys of loop n — which a token that stopped at loop e < n never
computed. Two answers, both from the literature, chosen by how the model was trained:

* ``latest`` (Huginn, Geiping et al. 2025): the skipped slots get the keys and values of the
  token's latest computed loop, copied forward (``LayerCache.copy_position``); the cache keeps a
  slot per layer application. Used for every model without ``kv_sharing``.
* ``shared`` (Mixture-of-Recursions' recursive KV sharing, Bae et al. 2025): a model trained with
  ``LoopedConfig.kv_sharing`` attends in every loop to the keys of loop 1, so the cache holds the
  block once (1/L of the per-application cache) and a stopped token leaves nothing to fill.

The prompt is read at full depth (every slot filled for every prompt position), so the first new
token, predicted by the prefill, always uses every loop.

Dimension letters: b batch, a rows still looping, t time, v vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from looped.cache import DecodeCache
from looped.depthwise import DepthwiseDecoder
from looped.mixers import Padding

RULES = ("fixed", "entropy", "kl", "stable", "gate")


@dataclass(frozen=True)
class ExitRule:
    """An exit rule and its parameter, written as ``looped.adaptive`` names them: ``entropy_0.5``."""

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
    """Decides, loop after loop, which rows' tokens stop: the rule's running state per row, reset when a row
    starts a new token (``restart``, depth-wise decoding) or dropped with rows that left (``keep``)."""

    def __init__(self, rule: ExitRule, batch: int, device: torch.device) -> None:
        self.rule = rule
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)  # loops decided on for this token
        self.previous: Tensor | None = None  # [b v] log-probabilities of the last loop (kl)
        self.argmax = torch.zeros(batch, dtype=torch.long, device=device)  # the last loop's argmax (stable)
        self.unchanged = torch.zeros(batch, dtype=torch.long, device=device)  # stable: run length
        self.cdf = torch.zeros(batch, device=device)  # gate: probability of having exited by now
        self.survival = torch.ones(batch, device=device)  # gate: probability of not having exited

    def stop(self, logprobs: Tensor | None, halt_logits: Tensor | None) -> Tensor:
        """``[b]`` bool: which rows stop after this loop."""
        value, kind, first = self.rule.value, self.rule.kind, self.seen == 0
        self.seen = self.seen + 1
        if kind == "fixed":
            return torch.zeros_like(first)
        if kind == "entropy":
            return -(logprobs.exp() * logprobs).sum(-1) < value
        if kind == "kl":  # kl_div(input, target) is KL(target ‖ input): here KL(p_n ‖ p_{n-1})
            previous = logprobs if self.previous is None else self.previous
            settled = ~first & (F.kl_div(previous, logprobs, reduction="none", log_target=True).sum(-1) < value)
            self.previous = logprobs
            return settled
        if kind == "stable":
            argmax = logprobs.argmax(-1)
            self.unchanged = torch.where(~first & (argmax == self.argmax), self.unchanged + 1, 0)
            self.argmax = argmax
            return self.unchanged >= value
        halt = torch.sigmoid(halt_logits.float())  # gate: p(n) = λ_n ∏_{j<n} (1 − λ_j), as looped.halting
        self.cdf = torch.where(first, 0, self.cdf) + torch.where(first, 1, self.survival) * halt
        self.survival = torch.where(first, 1, self.survival) * (1 - halt)
        return self.cdf >= value

    def keep(self, rows: Tensor) -> None:
        """Keep the state of ``rows`` (a bool mask over the rows) only."""
        self.seen, self.argmax, self.unchanged = self.seen[rows], self.argmax[rows], self.unchanged[rows]
        self.cdf, self.survival = self.cdf[rows], self.survival[rows]
        self.previous = None if self.previous is None else self.previous[rows]

    def restart(self, rows: Tensor) -> None:
        """``rows`` (a bool mask) start a new token: their next loop is its first."""
        self.seen = self.seen.masked_fill(rows, 0)


@dataclass
class AdaptiveDecoding:
    """What ``generate(..., exit=RULE, return_loops=True)`` returns."""

    tokens: Tensor
    """``[b p+n]`` the prompt and its continuation, as ``generate`` returns it."""
    loops: Tensor
    """``[b n]`` the loops each new token used (the first, predicted by the full-depth prefill: max)."""
    kv_strategy: str
    """``latest`` or ``shared``: what the layer applications a token skipped left in the cache."""

    @property
    def mean_loops(self) -> float:
        return self.loops.float().mean().item()


class AdaptiveDecoder:
    """One ``DecodeCache`` and the per-token exit of one batch being decoded (see the module doc)."""

    def __init__(self, model, rule: ExitRule, loops: int, cache: DecodeCache) -> None:
        config = model.config
        if rule.kind != "fixed" and not all(layer.attn.kv_cache for layer in model.block):
            raise ValueError(
                "per-token exit in decoding needs KV-cache mixers in the block (softmax, sparse): a recurrent "
                "state cannot be filled for the loops a token skipped; use exit=None or exit='fixed'"
            )
        if rule.kind == "gate" and model.exit_gate is None:
            raise ValueError("exit rule gate needs a model with a learned exit gate (LoopedConfig.exit_gate)")
        self.model, self.rule, self.loops, self.cache = model, rule, loops, cache
        self.kv_strategy = "shared" if config.kv_sharing else "latest"
        slots = model.decode_slots(cache, loops)
        p, k = config.prelude_layers, config.block_layers
        self.prelude_slots = slots[:p]
        self.block_slots = [slots[p + n * k : p + (n + 1) * k] for n in range(loops)]  # [loop][layer]
        self.coda_slots = slots[p + loops * k :]

    def step(self, token: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Read one new token per row ``[b 1]``; return the next token ``[b]`` and the loop each row stopped at."""
        model, offset, b = self.model, self.cache.length, token.shape[0]
        padding = model.padding(attention_mask, b, offset + 1)
        x = model.embed_tokens(token, offset, padding)
        for layer, slot in zip(model.prelude, self.prelude_slots, strict=True):
            x = layer(x, model.rope, slot, padding)
        loop_input, shared = x, model.shared_kv()
        rows = torch.arange(b, device=token.device)  # the rows still looping
        subset = None  # None while every row still loops: the full slots, no gathering
        next_token = torch.empty(b, dtype=torch.long, device=token.device)
        stopped_at = torch.full((b,), self.loops, dtype=torch.long, device=token.device)
        decide = OnlineExit(self.rule, b, token.device)
        for n in range(1, self.loops + 1):
            if model.config.input_injection == "add" and n > 1:
                x = x + loop_input
            for layer, slot, kv in zip(model.block, self.block_slots[n - 1], shared, strict=True):
                x = layer(x, model.rope, slot.rows(subset), padding, None if kv is None else kv.rows(subset))
            logits = self.read_out(x, subset, attention_mask) if self.rule.reads_prediction else None
            if n == self.loops:
                stop = torch.ones(len(rows), dtype=torch.bool, device=x.device)
            else:
                logprobs = None if logits is None else logits.float().log_softmax(-1)
                halts = model.halt_logits(x[:, -1]) if self.rule.kind == "gate" else None
                stop = decide.stop(logprobs, halts)
            if not bool(stop.any()):
                continue
            everyone = subset is None and bool(stop.all())
            if logits is None:  # read out only the rows that stop (the coda writes only their cache rows)
                logits = self.read_out(x if everyone else x[stop], None if everyone else rows[stop], attention_mask)
            else:
                logits = logits[stop]
            next_token[rows[stop]] = logits.argmax(-1)
            stopped_at[rows[stop]] = n
            if bool(stop.all()):
                break
            rows, x, loop_input = rows[~stop], x[~stop], loop_input[~stop]
            decide.keep(~stop)
            subset = rows
            padding = None if padding is None else Padding(attention_mask[rows])
        if self.kv_strategy == "latest":
            self.fill_latest(stopped_at, offset)
        self.cache.length += 1
        return next_token, stopped_at

    def read_out(self, x: Tensor, subset: Tensor | None, attention_mask: Tensor | None) -> Tensor:
        """Logits ``[a v]`` of the rows ``subset`` (None: all) from their states ``x`` ``[a 1 d]``; the coda
        writes its cache slots for those rows only (a later loop's readout overwrites them)."""
        mask = attention_mask if attention_mask is None or subset is None else attention_mask[subset]
        padding = None if mask is None else Padding(mask)
        coda = iter([slot.rows(subset) for slot in self.coda_slots])
        return self.model.readout(x, slots=coda, padding=padding)[:, -1]

    def fill_latest(self, stopped_at: Tensor, position: int) -> None:
        """Huginn's "latest": each slot a token skipped gets the keys of the last loop it ran, at its position."""
        for e in range(1, self.loops):
            rows = (stopped_at == e).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            for later in self.block_slots[e:]:
                for slot, source in zip(later, self.block_slots[e - 1], strict=True):
                    slot.copy_position(source, rows, position)


def greedy_loop(
    first: Tensor,
    step: Callable[[Tensor, Tensor | None], Tensor],
    max_new_tokens: int,
    eos_id: int | None,
    attention_mask: Tensor | None,
) -> list[Tensor]:
    """The ``max_new_tokens`` greedy tokens ``[b 1]`` after the prompt, from its first one ``[b]``:
    ``step(token [b 1], attention_mask)`` reads a token and returns the next ``[b]``. With ``eos_id``, a
    row that emitted it keeps emitting it, and decoding stops once every row has; ``attention_mask``
    (left padding) grows by one column per token."""
    token, tokens = first, []
    done = torch.zeros(len(first), dtype=torch.bool, device=first.device)
    for n in range(max_new_tokens):
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        tokens.append(token[:, None])
        if n == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
            break
        if attention_mask is not None:
            attention_mask = F.pad(attention_mask, (0, 1), value=1)
        token = step(token[:, None], attention_mask)
    return tokens


SCHEDULES = ("synchronous", "depthwise")


@torch.no_grad()
def generate_adaptive(
    model,
    prompt: Tensor,
    max_new_tokens: int,
    exit: str | ExitRule,
    eos_id: int | None = None,
    loops: int | None = None,
    attention_mask: Tensor | None = None,
    schedule: str = "synchronous",
) -> AdaptiveDecoding:
    """Greedy decoding in which every new token stops at its own loop (``LoopedTransformer.generate``'s ``exit``).

    ``schedule``: ``synchronous`` (``AdaptiveDecoder``: the rows of a token loop together, stopped ones leave;
    a step costs its deepest row) or ``depthwise`` (``looped.depthwise``: each row at its own token and loop,
    every block application a full batch; the batch costs its busiest row's sum of loops). Both decode the
    same tokens. A model with a recurrent mixer (which may only decode ``fixed``) decodes synchronously.
    """
    rule = ExitRule.parse(exit) if isinstance(exit, str) else exit
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: write one of {', '.join(SCHEDULES)}")
    loops = model.config.loops if loops is None else loops
    b, p = prompt.shape
    cache = DecodeCache(capacity=p + max_new_tokens)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    first = model(prompt, loops=loops, cache=cache, attention_mask=attention_mask)[:, -1].argmax(-1)
    decoder = AdaptiveDecoder(model, rule, loops, cache)  # checks the model can decode with this rule
    if max_new_tokens == 0:
        return AdaptiveDecoding(prompt, prompt.new_zeros(b, 0), decoder.kv_strategy)
    if schedule == "depthwise" and all(layer.attn.kv_cache for layer in model.modules() if hasattr(layer, "attn")):
        depthwise = DepthwiseDecoder(model, OnlineExit(rule, b, prompt.device), loops, cache, attention_mask)
        tokens, used = depthwise.decode(first, max_new_tokens, eos_id)
        return AdaptiveDecoding(torch.cat([prompt, tokens], dim=1), used, decoder.kv_strategy)
    used = [torch.full((b,), loops, dtype=torch.long, device=prompt.device)]  # the prefill: full depth

    def step(token: Tensor, mask: Tensor | None) -> Tensor:
        next_token, stopped_at = decoder.step(token, mask)
        used.append(stopped_at)
        return next_token

    tokens = greedy_loop(first, step, max_new_tokens, eos_id, attention_mask)
    return AdaptiveDecoding(
        tokens=torch.cat([prompt, *tokens], dim=1), loops=torch.stack(used, dim=1), kv_strategy=decoder.kv_strategy
    )
