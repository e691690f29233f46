"""Greedy decoding's entry points: ``generate`` (``LoopedTransformer.generate``) and its loop over tokens.

Every token reads the ``DecodeCache`` the prompt's forward filled, one position per layer application.
Without an exit rule each token runs the model's forward (every loop, ``LoopedTransformer.loop_step``);
with one (``exit=RULE``) each token stops at its own loop, on one of two schedules
(``looped.decoding.per_token``'s synchronous one, ``looped.decoding.depthwise``).

Dimension letters: b batch, p prompt length, n new tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from looped.decoding.depthwise import DepthwiseDecoder
from looped.decoding.exit_rules import ExitRule, OnlineExit
from looped.decoding.per_token import AdaptiveDecoder, AdaptiveDecoding
from looped.decoding.speculative import SelfSpeculativeDecoder
from looped.errors import MODEL_CONFIG, InputError
from looped.model.cache import DecodeCache
from looped.model.router import RowRouting


@torch.no_grad()
def generate(
    model,
    prompt: Tensor,
    max_new_tokens: int,
    eos_id: int | None = None,
    loops: int | None = None,
    attention_mask: Tensor | None = None,
    exit: str | None = None,
    return_loops: bool = False,
    schedule: str = "synchronous",
    draft_loops: int | None = None,
    draft_tokens: int = 4,
) -> Tensor | AdaptiveDecoding:
    """Greedy continuation of ``prompt`` ``[b p]``: ``[b p+n]`` with ``n <= max_new_tokens``
    (``LoopedTransformer.generate``: this function is that method).

    One forward over the prompt fills a ``DecodeCache``; each later token costs
    one position per layer application. With ``eos_id``, a row that has emitted
    it keeps emitting it, and decoding stops once every row has. Prompts of different
    lengths go left-padded, with ``attention_mask`` ``[b p]`` (0 at the padding).
    Dropout follows the module's mode: call ``eval()`` first for deterministic output.

    ``exit`` (``entropy_0.5``, ``kl_0.01``, ``stable_2``, ``gate_0.5``, ``fixed``) lets every
    new token stop at its own loop, ``loops`` at most (``looped.decoding.per_token``);
    ``return_loops=True`` then returns an ``AdaptiveDecoding`` with the loops each token used.
    ``schedule`` says how a batch's rows share the block: ``synchronous`` (a token's rows loop together,
    stopped rows leave) or ``depthwise`` (each row at its own token and loop, ``looped.decoding.depthwise``);
    the tokens are the same.

    ``exit='router'`` decodes a model with a Mixture-of-Recursions router (``LoopedConfig.router``; the only
    exit such a model takes): every token runs the loops its router's causal decisions give it (expert-choice:
    its logit > 0 at each loop, token-choice: its depth), each loop's cache holding only its tokens' keys (with
    ``kv_sharing``: loop 1's). A loop runs only the rows routed to it, on either ``schedule``.

    ``draft_loops=n`` (``n < loops``) decodes the same tokens faster when the first n loops often predict
    what all of them do: each round the model drafts ``draft_tokens`` tokens with n loops and checks them
    with the remaining loops in one pass (``looped.decoding.speculative``).
    """
    b, p = prompt.shape
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if p < 1:
        raise ValueError("generate needs a prompt of at least one token")
    if p + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"prompt of {p} tokens + max_new_tokens={max_new_tokens} exceeds LoopedConfig.max_seq_len="
            f"{model.config.max_seq_len}; lower max_new_tokens to at most {model.config.max_seq_len - p} "
            "or raise max_seq_len"
        )
    if draft_loops is not None and (exit is not None or return_loops):
        raise ValueError("draft_loops decodes every token at full depth: drop exit/return_loops, or draft_loops")
    router = getattr(model, "router", None)
    if exit == "router" or router is not None:
        if router is None:
            raise ValueError("exit='router' decodes with a Mixture-of-Recursions router; this model has none")
        if exit != "router" or return_loops or draft_loops is not None:
            raise ValueError(
                f"this model routes tokens through its loops ({model.config.router}): decode with exit='router' "
                "(the router's causal decisions), without return_loops or draft_loops"
            )
        if model.config.router == "expert_choice" and model.config.router_aux_weight == 0:
            raise InputError(
                f"{MODEL_CONFIG}.router_aux_weight: is 0, so no router learned the causal decision expert-choice "
                "decodes with (its top-k looks ahead); train with router_aux_weight > 0 (e.g. 0.01)"
            )
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r}: write one of {', '.join(SCHEDULES)}")
        with router.deciding("causal"):  # every forward below: each token's own decision, never a look ahead
            if schedule == "depthwise" and max_new_tokens > 0:
                return decode_routed_depthwise(model, prompt, max_new_tokens, eos_id, loops, attention_mask)
            return decode_cached(model, prompt, max_new_tokens, eos_id, loops, attention_mask)
    if exit is not None or return_loops:
        decoding = generate_adaptive(
            model, prompt, max_new_tokens, exit or "fixed", eos_id, loops, attention_mask, schedule
        )
        return decoding if return_loops else decoding.tokens
    return decode_cached(model, prompt, max_new_tokens, eos_id, loops, attention_mask, draft_loops, draft_tokens)


def decode_cached(
    model,
    prompt: Tensor,
    max_new_tokens: int,
    eos_id: int | None,
    loops: int | None,
    attention_mask: Tensor | None,
    draft_loops: int | None = None,
    draft_tokens: int = 4,
) -> Tensor:
    """``generate`` with every token at the model's own depth: one forward per token over the ``DecodeCache``."""
    if max_new_tokens == 0:
        return prompt
    p = prompt.shape[1]
    cache = DecodeCache(capacity=p + max_new_tokens)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # nothing padded: no mask to extend
    if draft_loops is not None:  # checked before the prefill: a bad draft fails at once
        full = model.config.loops if loops is None else loops
        speculative = SelfSpeculativeDecoder(model, draft_loops, full, cache, draft_tokens)
    first = model(prompt, loops=loops, cache=cache, attention_mask=attention_mask)[:, -1].argmax(-1)
    if draft_loops is not None:
        return torch.cat([prompt, speculative.decode(first, max_new_tokens, eos_id, attention_mask)], dim=1)

    def step(token: Tensor, mask: Tensor | None) -> Tensor:
        return model(token, loops=loops, cache=cache, attention_mask=mask)[:, -1].argmax(-1)

    tokens = [prompt, *greedy_loop(first, step, max_new_tokens, eos_id, attention_mask)]
    return torch.cat(tokens, dim=1)


def decode_routed_depthwise(
    model, prompt: Tensor, max_new_tokens: int, eos_id: int | None, loops: int | None, attention_mask: Tensor | None
) -> Tensor:
    """``generate(exit='router', schedule='depthwise')``: the prefill as ``decode_cached``'s, then every row at its
    own token and loop, each token's loops chosen by the router (``looped.decoding.depthwise``)."""
    b, p = prompt.shape
    loops = model.config.loops if loops is None else loops
    cache = DecodeCache(capacity=p + max_new_tokens)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    first = model(prompt, loops=loops, cache=cache, attention_mask=attention_mask)[:, -1].argmax(-1)
    routing = RowRouting(model.router, b, prompt.device)
    tokens, _ = DepthwiseDecoder(model, None, loops, cache, attention_mask, routing).decode(
        first, max_new_tokens, eos_id
    )
    return torch.cat([prompt, tokens], dim=1)


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
    a step costs its deepest row) or ``depthwise`` (``looped.decoding.depthwise``: each row at its own token and loop,
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
