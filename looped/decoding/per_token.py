"""Per-token depth in decoding: every new token stops looping at its own loop, and stopped rows cost nothing.

``LoopedTransformer.generate(prompt, n, exit="entropy_0.5")`` decodes like ``generate`` but decides,
after every loop of every new token, whether that token has looped enough. The rules
(``fixed``, ``entropy_τ``, ``kl_τ``, ``stable_m``, ``gate_q``) are ``looped.decoding.exit_rules``', the
same ones evaluation applies offline, decided here from what the loops so far predict.

A rule that reads the prediction runs the readout (coda, norm, head) after every loop of every
still-looping token: with a vocabulary much wider than the model that costs more than a layer, so
the gate rule is the one that saves the most compute.

**Stopped rows are not computed.** Two schedules, the same tokens. ``synchronous`` (the default,
``AdaptiveDecoder`` here): the rows still looping on a token run as a sub-batch; after each loop the
rows whose token stopped leave it (their activations are dropped, their cache slots read through
``RowSlot`` views of the rows left), so a loop costs what its remaining rows cost, and a token as
many loops as its deepest row. ``depthwise`` (``looped.decoding.depthwise``): a row whose token stopped
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

from dataclasses import dataclass

import torch
from torch import Tensor

from looped.decoding.exit_rules import ExitRule, OnlineExit
from looped.model.cache import DecodeCache
from looped.model.mixers import Padding
from looped.model.step import LoopStep


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
        if rule.kind != "fixed" and not all(layer.attn.kv_cache for layer in model.block):
            raise ValueError(
                "per-token exit in decoding needs KV-cache mixers in the block (softmax, sparse): a recurrent "
                "state cannot be filled for the loops a token skipped; use exit=None or exit='fixed'"
            )
        if rule.kind == "gate" and model.exit_gate is None:
            raise ValueError("exit rule gate needs a model with a learned exit gate (LoopedConfig.exit_gate)")
        self.model, self.rule, self.loops, self.cache = model, rule, loops, cache
        self.kv_strategy = "shared" if model.config.kv_sharing else "latest"
        self.slots = model.decode_slots(cache, loops)

    def step(self, token: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Read one new token per row ``[b 1]``; return the next token ``[b]`` and the loop each row stopped at."""
        model, offset, b = self.model, self.cache.length, token.shape[0]
        padding = model.padding(attention_mask, b, offset + 1)
        x = model.run_layers(model.prelude, model.embed_tokens(token, offset, padding), self.slots.prelude, padding)
        loop_input, shared = x, model.shared_kv()
        rows = torch.arange(b, device=token.device)  # the rows still looping
        subset = None  # None while every row still loops: the full slots, no gathering
        next_token = torch.empty(b, dtype=torch.long, device=token.device)
        stopped_at = torch.full((b,), self.loops, dtype=torch.long, device=token.device)
        decide = OnlineExit(self.rule, b, token.device)
        for n in range(1, self.loops + 1):
            x = model.loop_step(x, LoopStep(n, loop_input, self.slots.loops[n - 1], padding, shared, subset))
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
        coda = [slot.rows(subset) for slot in self.slots.coda]
        return self.model.readout(x, slots=coda, padding=padding)[:, -1]

    def fill_latest(self, stopped_at: Tensor, position: int) -> None:
        """Huginn's "latest": each slot a token skipped gets the keys of the last loop it ran, at its position."""
        for e in range(1, self.loops):
            rows = (stopped_at == e).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            for later in self.slots.loops[e:]:
                for slot, source in zip(later, self.slots.loops[e - 1], strict=True):
                    slot.copy_position(source, rows, position)
