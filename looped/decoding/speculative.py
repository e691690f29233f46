"""Self-speculative greedy decoding: the model drafts with n < L loops and checks at L (``draft_loops=n``).

A looped model is its own draft model: its first n loops are a shallower model with the same
weights (Huginn, Geiping et al. 2025, suggests this for recurrent depth). One round, from the next
token (already verified at L):

1. the draft reads it and ``k`` of its own guesses, one position at a time, through the prelude and
   loops ``1..n`` (writing those layer applications' own decode-cache slots) and reads each guess out
   after loop n;
2. the verify pass takes the draft's ``k + 1`` states after loop n and runs loops ``n+1..L`` and the
   readout over all of them at once: the full model's next token after every position;
3. the longest prefix on which draft and full model agree is kept, plus the full model's token after
   it; the cache goes back to the kept positions (``DecodeCache.length``: the rejected positions'
   keys are overwritten by the next round).

Why the tokens are plain decoding's at L: the state after loop n at a position depends only on
the tokens up to it through loops ``1..n``, which the draft computed for exactly the tokens the
verify reads; loops ``n+1..L`` then see what a full forward would. The draft's readout writes the
coda's slots at positions the verify pass writes again. A recurrent mixer (linear attention) cannot
go back: its slot is a running sum over every position, rejected ones included, so it is refused.

Dimension letters: b batch, k draft tokens per round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from looped.model.cache import DecodeCache
from looped.model.mixers import Padding
from looped.model.step import LoopStep


@dataclass
class Speculation:
    """What a self-speculative decode produced: its tokens and how many draft tokens were kept."""

    tokens: Tensor
    """``[b p+n]`` the prompt and its greedy continuation (plain decoding's at L)."""
    drafted: int
    """Draft tokens proposed (per row; a batch keeps the prefix every row agrees on)."""
    accepted: int
    """Of those, how many the full model agreed with."""

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)


def check_draft(model, draft_loops: int, loops: int, draft_tokens: int) -> None:
    """One clear line when ``model`` cannot draft with ``draft_loops`` of its ``loops``."""
    if not 1 <= draft_loops < loops:
        raise ValueError(
            f"draft_loops={draft_loops}: the draft runs fewer loops than the model it drafts for; "
            f"pick 1..{loops - 1} (loops={loops})"
        )
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens={draft_tokens}: the draft proposes at least 1 token per round")
    if not all(layer.attn.kv_cache for layer in model.modules() if hasattr(layer, "attn")):
        raise ValueError(
            "draft_loops needs keys kept per position in every layer (softmax or sparse attention): a "
            "linear-attention layer's state is a running sum that cannot drop rejected draft tokens; "
            "decode without draft_loops"
        )
    if model.config.kv_sharing:
        raise ValueError(
            "draft_loops with kv_sharing is not supported: decode without draft_loops (kv_sharing already "
            "keeps one cache slot per block layer)"
        )


class SelfSpeculativeDecoder:
    """Greedy decoding at ``loops`` whose rounds draft ``draft_tokens`` tokens with ``draft_loops`` loops.

    ``cache`` is the ``DecodeCache`` a full forward at ``loops`` filled with the prompt.
    """

    def __init__(self, model, draft_loops: int, loops: int, cache: DecodeCache, draft_tokens: int = 4) -> None:
        check_draft(model, draft_loops, loops, draft_tokens)
        self.model, self.cache = model, cache
        self.draft_loops, self.loops, self.draft_tokens = draft_loops, loops, draft_tokens
        self.slots = model.decode_slots(cache, loops)
        self.drafted = self.accepted = 0

    def padding(self, attention_mask: Tensor | None, length: int, batch: int) -> Padding | None:
        """The padding of ``length`` positions: the prompt's mask, then ones for every generated position."""
        if attention_mask is None:
            return None
        return self.model.padding(F.pad(attention_mask, (0, length - attention_mask.shape[1]), value=1), batch, length)

    def draft_state(self, token: Tensor, padding: Padding | None) -> tuple[Tensor, Tensor]:
        """``token`` ``[b 1]`` at position ``cache.length`` through the prelude and loops ``1..n``: the state
        after loop n and the loop input (for input injection in the later loops)."""
        model, offset = self.model, self.cache.length
        x = model.run_layers(model.prelude, model.embed_tokens(token, offset, padding), self.slots.prelude, padding)
        loop_input = x
        for n in range(1, self.draft_loops + 1):
            x = model.loop_step(x, LoopStep(n, loop_input, self.slots.loops[n - 1], padding))
        return x, loop_input

    def round(self, token: Tensor, k: int, attention_mask: Tensor | None, done: Tensor) -> Tensor:
        """One round from ``token`` ``[b]`` (not yet in the cache): the verified tokens ``[b a+1]`` after it."""
        model, cache, b = self.model, self.cache, len(token)
        start = cache.length
        inputs, states, injections = [token], [], []
        for j in range(k + 1):
            cache.length = start + j
            padding = self.padding(attention_mask, start + j + 1, b)
            x, loop_input = self.draft_state(inputs[j][:, None], padding)
            states.append(x)
            injections.append(loop_input)
            if j < k:  # the last input's state is the verify pass's; its guess would go unchecked
                inputs.append(model.readout(x, slots=self.slots.coda, padding=padding)[:, -1].argmax(-1))
        cache.length = start
        padding = self.padding(attention_mask, start + k + 1, b)
        x, loop_input = torch.cat(states, dim=1), torch.cat(injections, dim=1)
        for n in range(self.draft_loops + 1, self.loops + 1):
            x = model.loop_step(x, LoopStep(n, loop_input, self.slots.loops[n - 1], padding))
        verified = model.readout(x, slots=self.slots.coda, padding=padding).argmax(-1)  # [b k+1]
        if k:
            agree = (torch.stack(inputs[1:], dim=1) == verified[:, :k]).long().cumprod(dim=1).sum(dim=1)
            kept = int(agree.masked_fill(done, k).min())  # a finished row's tokens are eos whatever it guesses
        else:
            kept = 0
        self.drafted, self.accepted = self.drafted + k, self.accepted + kept
        cache.length = start + kept + 1  # positions after the kept ones hold rejected guesses: dropped
        return verified[:, : kept + 1]

    def decode(self, first: Tensor, max_new_tokens: int, eos_id: int | None, attention_mask: Tensor | None) -> Tensor:
        """The ``[b n]`` greedy tokens after the prompt, ``n <= max_new_tokens``, from the first one ``[b]``
        (``greedy_loop``'s rules: a row that emitted ``eos_id`` keeps emitting it; stop once every row has)."""
        tokens, produced = [first[:, None]], 1
        done = first == eos_id if eos_id is not None else torch.zeros_like(first, dtype=torch.bool)
        while produced < max_new_tokens and not bool(done.all()):
            k = min(self.draft_tokens, max_new_tokens - produced - 1)
            new = self.round(tokens[-1][:, -1], k, attention_mask, done)
            tokens.append(new)
            produced += new.shape[1]
            if eos_id is not None:
                done |= (new == eos_id).any(dim=1)
        out = torch.cat(tokens, dim=1)[:, :max_new_tokens]
        if eos_id is None:
            return out
        finished = (out == eos_id).long().cumsum(dim=1) > 0
        out = out.masked_fill(finished, eos_id)
        every = finished.all(dim=0)
        return out[:, : int(every.nonzero()[0]) + 1] if bool(every.any()) else out
