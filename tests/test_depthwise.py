"""Depth-wise batching (``looped.decoding.depthwise``): every row at its own token and loop.

Reference: the synchronous schedule (``AdaptiveDecoder``: a token's rows loop together), which decodes the
same function; depth-wise must give the same tokens and exit loops, only scheduled differently. Its
promise, that the block runs about mean-loops times per token instead of deepest-row times, is counted
in block applications (a hook), not timed.
"""

import pytest
import torch
from test_adaptive_decode import NEW, PROMPT, SHAPES, VOCAB, make, prompts, rules

from conftest import tiny_model
from looped.decoding.depthwise import DepthwiseDecoder
from looped.decoding.exit_rules import ExitRule, OnlineExit
from looped.decoding.greedy import greedy_loop
from looped.decoding.per_token import AdaptiveDecoder
from looped.model.cache import DecodeCache

MIXERS = {
    "sparse-local": dict(attention="sparse", mixer_options={"sparse": {"pattern": "local", "window": 3}}),
    "sparse-and-softmax": dict(
        attention=["sparse", "softmax"], mixer_options={"sparse": {"pattern": "strided", "stride": 3}}
    ),
}


def both(model, ids, rule, **kwargs):
    return [
        model.generate(ids, NEW, exit=rule, return_loops=True, schedule=schedule, **kwargs)
        for schedule in ("depthwise", "synchronous")
    ]


@pytest.mark.parametrize("kv_sharing", [False, True], ids=["latest", "shared"])
@pytest.mark.parametrize("shape", SHAPES)
def test_depthwise_decodes_what_the_synchronous_schedule_decodes(shape, kv_sharing):
    model = make(shape, kv_sharing)
    ids = prompts()
    for rule in ["fixed", *rules(model)]:
        depthwise, synchronous = both(model, ids, rule)
        assert torch.equal(depthwise.tokens, synchronous.tokens), rule
        assert torch.equal(depthwise.loops, synchronous.loops), rule


@pytest.mark.parametrize("mixer", MIXERS)
def test_depthwise_applies_each_mixers_own_visibility(mixer):
    """Sparse patterns see keys by position: a row's query at its own position, padded rows included."""
    model = tiny_model(vocab_size=VOCAB, max_seq_len=32, d_model=32, n_heads=4, d_ff=64, loops=3, **MIXERS[mixer])
    model = model.double()
    ids, mask = prompts(3), torch.ones(3, PROMPT, dtype=torch.long)
    mask[1, :2] = mask[2, :4] = 0  # left padding
    for rule in ("stable_1", "kl_0.02"):
        depthwise, synchronous = both(model, ids, rule, attention_mask=mask)
        assert torch.equal(depthwise.tokens, synchronous.tokens), rule
        assert torch.equal(depthwise.loops, synchronous.loops), rule
        assert depthwise.mean_loops < model.config.loops, f"{rule} never stopped early: the test would show nothing"


def test_depthwise_stops_each_row_at_its_eos_as_generate_does():
    model = make("middle-1+2x3+1")
    ids = prompts()
    plain = model.generate(ids, NEW, exit="stable_1")
    eos = int(plain[0, PROMPT + 3])  # a token row 0 emits early on: its EOS
    depthwise, synchronous = both(model, ids, "stable_1", eos_id=eos)
    assert torch.equal(depthwise.tokens, synchronous.tokens)
    assert bool((depthwise.tokens[0, PROMPT + 3 :] == eos).all())
    stopped = (depthwise.tokens[:, PROMPT:] == eos).cumsum(1) > 0  # at and after each row's first EOS
    after = torch.cat([torch.zeros_like(stopped[:, :1]), stopped[:, :-1]], dim=1)
    assert bool((depthwise.loops[after] == 0).all()), "a row past its EOS is not computed"
    assert torch.equal(depthwise.loops[~after], synchronous.loops[~after])


def block_applications(model, schedule: str, rule: str, ids) -> tuple[int, torch.Tensor]:
    """How often the block's first layer ran in decoding (the prefill excluded), and the loops each token used."""
    calls = []
    handle = model.block[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        decoded = model.generate(ids, NEW, exit=rule, return_loops=True, schedule=schedule)
    finally:
        handle.remove()
    return len(calls) - model.config.loops, decoded.loops[:, 1:]  # the prefill ran the block L times


def test_depthwise_runs_the_block_once_per_tick_of_the_busiest_row_not_per_deepest_loop():
    """Synchronous: a token's step runs the block as often as its deepest row loops. Depth-wise: once per tick,
    and a row needs its own loops' sum of ticks, so the busiest row's sum — close to mean loops per token."""
    model = make("injection-gate-1x4")
    ids = prompts(8)
    ticks, loops = block_applications(model, "depthwise", "gate_0.5", ids)
    steps, same = block_applications(model, "synchronous", "gate_0.5", ids)
    assert torch.equal(loops, same)
    assert ticks == int(loops.sum(1).max())
    assert steps == int(loops.max(0).values.sum())
    assert ticks < steps, "every row stopped at the same loop: nothing to show"


@pytest.mark.parametrize("shape", ["looped-2x3", "middle-1+2x3+1"])
def test_depthwise_leaves_the_cache_the_synchronous_schedule_leaves(shape):
    """Huginn's "latest": a loop a token skipped holds, at its column, the keys of the last loop it ran — in
    every block layer's slot of every loop, as the synchronous schedule's copies leave them."""
    model, rule = make(shape), ExitRule.parse("stable_1")
    ids, loops, read = prompts(), model.config.loops, PROMPT + NEW - 1  # the last token is never read
    caches = [DecodeCache(PROMPT + NEW) for _ in range(2)]
    first = [model(ids, cache=cache)[:, -1].argmax(-1) for cache in caches][0]
    synchronous = AdaptiveDecoder(model, rule, loops, caches[0])
    used = []

    def step(token, _mask):
        next_token, stopped_at = synchronous.step(token, None)
        used.append(stopped_at)
        return next_token

    greedy_loop(first, step, NEW, None, None)
    depthwise = DepthwiseDecoder(model, OnlineExit(rule, len(ids), ids.device), loops, caches[1], None)
    _, depthwise_loops = depthwise.decode(first, NEW, None)
    assert torch.equal(depthwise_loops[:, 1:], torch.stack(used, dim=1))
    assert bool((depthwise_loops < loops).any()), "no token stopped early: nothing to check"
    b = len(ids)
    for layer, slots in enumerate(depthwise.block_slots):
        for n in range(loops):
            expected = synchronous.slots.loops[n][layer]
            torch.testing.assert_close(slots.keys[n * b : (n + 1) * b, :, :read], expected._keys[:, :, :read])
            torch.testing.assert_close(slots.values[n * b : (n + 1) * b, :, :read], expected._values[:, :, :read])


def test_depthwise_places_learned_positions_at_each_rows_own_position():
    """Without RoPE, a token's position enters through the learned position table, read per row."""
    model = make("middle-1+2x3+1", pos_encoding="learned")
    ids, mask = prompts(3), torch.ones(3, PROMPT, dtype=torch.long)
    mask[1, :3] = 0  # left padding: row 1's tokens start at position 0 three columns later
    depthwise, synchronous = both(model, ids, "stable_1", attention_mask=mask)
    assert torch.equal(depthwise.tokens, synchronous.tokens)
    assert torch.equal(depthwise.loops, synchronous.loops)
