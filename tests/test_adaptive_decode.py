"""Per-token depth in decoding (``looped.decoding.per_token``) and recursive KV sharing (``kv_sharing``).

References: today's ``generate`` (the rule forced never to exit early), each row decoded alone
(batched adaptive decoding), the parallel forward's per-loop predictions with the rule applied
offline, loop by loop (a KV-sharing model's keys do not depend on where earlier tokens stopped),
and the cache's own slots (Huginn's "latest" fill).
"""

import math

import pytest
import torch

from conftest import tiny_model
from looped import LoopedLM
from looped.decoding.exit_rules import ExitRule
from looped.decoding.per_token import AdaptiveDecoder
from looped.errors import InputError
from looped.model.cache import DecodeCache
from looped.training.halting import exit_distribution

VOCAB, PROMPT, NEW = 23, 6, 14
SHAPES = {
    "looped-2x3": dict(block_layers=2, loops=3),
    "middle-1+2x3+1": dict(prelude_layers=1, block_layers=2, loops=3, coda_layers=1),
    "injection-gate-1x4": dict(block_layers=1, loops=4, input_injection="add", exit_gate=True),
}


def make(shape: str, kv_sharing: bool = False, **fields):
    fields = dict(SHAPES[shape], **fields)
    model = tiny_model(
        vocab_size=VOCAB, max_seq_len=32, d_model=32, n_heads=4, d_ff=64, kv_sharing=kv_sharing, **fields
    )
    return model.double()  # fp64: a threshold decision never flips on rounding between batch shapes


def prompts(batch: int = 5, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))


def rules(model) -> list[str]:
    """Rules with thresholds that stop some tokens early and not others on this (untrained) model."""
    entropies = model(prompts()).log_softmax(-1)
    median = (-(entropies.exp() * entropies).sum(-1)).median().item()
    found = [f"entropy_{median:.4f}", "stable_1", "kl_0.02"]
    return found + (["gate_0.5"] if model.exit_gate is not None else [])


@pytest.mark.parametrize("kv_sharing", [False, True], ids=["latest", "shared"])
@pytest.mark.parametrize("shape", SHAPES)
def test_never_early_equals_generate(shape, kv_sharing):
    model = make(shape, kv_sharing)
    ids = prompts()
    decoded = model.generate(ids, NEW, exit="fixed", return_loops=True)
    assert torch.equal(decoded.tokens, model.generate(ids, NEW))
    assert decoded.kv_strategy == ("shared" if kv_sharing else "latest")
    assert bool((decoded.loops == model.config.loops).all())


@pytest.mark.parametrize("kv_sharing", [False, True], ids=["latest", "shared"])
@pytest.mark.parametrize("shape", SHAPES)
def test_batched_adaptive_decoding_equals_each_row_alone(shape, kv_sharing):
    model = make(shape, kv_sharing)
    ids = prompts()
    for rule in rules(model):
        batched = model.generate(ids, NEW, exit=rule, return_loops=True)
        assert 1 <= batched.loops.min() and batched.loops.max() <= model.config.loops
        assert batched.mean_loops < model.config.loops, f"{rule} never stopped early: the test would show nothing"
        for row in range(len(ids)):
            alone = model.generate(ids[row : row + 1], NEW, exit=rule, return_loops=True)
            assert torch.equal(alone.tokens[0], batched.tokens[row]), rule
            assert torch.equal(alone.loops[0], batched.loops[row]), rule


def test_left_padded_batch_decodes_each_row_as_alone():
    model = make("middle-1+2x3+1")
    rule = rules(model)[0]
    lengths = [PROMPT, 3, 5]
    ids = prompts(3)
    padded = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        padded[row, PROMPT - n :], mask[row, PROMPT - n :] = ids[row, :n], 1
    batched = model.generate(padded, NEW, exit=rule, attention_mask=mask, return_loops=True)
    for row, n in enumerate(lengths):
        alone = model.generate(ids[row : row + 1, :n], NEW, exit=rule, return_loops=True)
        assert torch.equal(batched.tokens[row, PROMPT:], alone.tokens[0, n:])
        assert torch.equal(batched.loops[row], alone.loops[0])


def offline_exit(rule: ExitRule, logprobs: torch.Tensor, halts: torch.Tensor | None) -> int:
    """The loop (1-based) a token with per-loop log-probabilities ``[n v]`` stops at, rule applied loop by loop."""
    loops = len(logprobs)
    cdf = exit_distribution(halts).cumsum(0) if halts is not None else None
    for n in range(1, loops):
        p = logprobs[n - 1]
        if rule.kind == "entropy" and -(p.exp() * p).sum() < rule.value:
            return n
        if rule.kind == "kl" and n >= 2 and (p.exp() * (p - logprobs[n - 2])).sum() < rule.value:
            return n
        if rule.kind == "stable" and n > rule.value:
            window = logprobs[n - 1 - int(rule.value) : n].argmax(-1)
            if bool((window == window[-1]).all()):
                return n
        if rule.kind == "gate" and cdf[n - 1] >= rule.value:
            return n
    return loops


@pytest.mark.parametrize("shape", ["looped-2x3", "injection-gate-1x4"])
def test_shared_kv_decoding_equals_parallel_forward_read_at_each_tokens_exit(shape):
    """With recursive KV sharing, every loop attends to loop 1's keys, which do not depend on where earlier
    tokens stopped: the parallel forward over the decoded sequence, read after each token's exit loop
    (found offline from its per-loop predictions), must give the decoded tokens."""
    model = make(shape, kv_sharing=True)
    ids = prompts()
    for text in rules(model):
        rule = ExitRule.parse(text)
        decoded = model.generate(ids, NEW, exit=text, return_loops=True)
        seq = decoded.tokens
        _, states = model(seq[:, :-1], return_loop_states=True)
        logprobs = torch.stack([model.readout(s).log_softmax(-1) for s in states])  # [n b t v]
        halts = torch.stack([model.halt_logits(s) for s in states]) if rule.kind == "gate" else None
        for row in range(len(ids)):
            for step in range(1, NEW):  # step 0 is the prefill's token, at full depth
                position = PROMPT + step - 1  # the token read at this step
                halt = None if halts is None else halts[:, row, position]
                stop = offline_exit(rule, logprobs[:, row, position], halt)
                assert decoded.loops[row, step] == stop, (text, row, step)
                assert seq[row, position + 1] == logprobs[stop - 1, row, position].argmax(), (text, row, step)


def decode_one_step(model, rule: str) -> AdaptiveDecoder:
    cache = DecodeCache(PROMPT + 4)
    model(prompts(), cache=cache)
    decoder = AdaptiveDecoder(model, ExitRule.parse(rule), model.config.loops, cache)
    decoder.stopped = decoder.step(torch.full((len(prompts()), 1), 1), None)[1]
    return decoder


def test_latest_fills_skipped_slots_with_the_last_computed_loop():
    model = make("looped-2x3")
    adaptive, full_depth = decode_one_step(model, "stable_1"), decode_one_step(model, "fixed")
    early = [(row, stop) for row, stop in enumerate(adaptive.stopped.tolist()) if stop < 3]
    assert early, "no token stopped early: nothing to check"
    for row, stop in early:
        for later in range(stop, 3):
            for layer, (slot, source) in enumerate(zip(adaptive.slots.loops[later], adaptive.slots.loops[stop - 1])):
                assert torch.equal(slot._keys[row, :, PROMPT], source._keys[row, :, PROMPT])
                assert torch.equal(slot._values[row, :, PROMPT], source._values[row, :, PROMPT])
                # a copy of the last loop run, not what running the skipped loop would have given
                computed = full_depth.slots.loops[later][layer]._keys[row, :, PROMPT]
                assert not torch.allclose(slot._keys[row, :, PROMPT], computed)


@pytest.mark.parametrize("loops", [2, 4])
def test_kv_sharing_caches_one_loop_of_the_block(loops):
    """Measured: the cache's bytes with sharing are 1/L of the per-application cache (no prelude or coda)."""
    sizes = {}
    for share in (False, True):
        model = make("looped-2x3", share, loops=loops)
        cache = DecodeCache(PROMPT + NEW)
        model(prompts(), cache=cache)
        sizes[share] = cache.nbytes
    assert sizes[True] * loops == sizes[False]
    assert len(cache.layers) == 2


def test_kv_sharing_forward_equals_cached_decoding_and_trains_key_projections_through_loop_one():
    model = make("middle-1+2x3+1", kv_sharing=True)
    ids = torch.cat([prompts(), prompts(seed=4)], dim=1)
    cache = DecodeCache(ids.shape[1])
    with torch.no_grad():
        full = model(ids)
        pieces = [model(ids[:, :5], cache=cache)]
        pieces += [model(ids[:, i : i + 1], cache=cache) for i in range(5, ids.shape[1])]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)
    # A different function from the unshared model of the same weights ...
    unshared = make("middle-1+2x3+1")
    assert not torch.allclose(unshared(ids), full)
    # ... whose key projections learn from loop 1 only (the later loops read loop 1's keys).
    model.train()
    model(ids).sum().backward()
    assert all(layer.attn.k_proj.weight.grad.abs().sum() > 0 for layer in model.block)


def test_exit_rule_names_and_refusals():
    assert ExitRule.parse("entropy_0.5") == ExitRule("entropy", 0.5)
    assert ExitRule.parse("stable_2").value == 2 and ExitRule.parse("fixed").kind == "fixed"
    for bad in ("entropy", "stable_1.5", "median_0.5", "fixed_3", "kl_x"):
        with pytest.raises(ValueError, match="exit rule"):
            ExitRule.parse(bad)
    with pytest.raises(ValueError, match="learned exit gate"):
        make("looped-2x3").generate(prompts(), 3, exit="gate_0.5")
    linear = tiny_model(vocab_size=VOCAB, max_seq_len=32, loops=2, attention="linear")
    with pytest.raises(ValueError, match="KV-cache mixers"):
        linear.generate(prompts(), 3, exit="stable_1")
    assert torch.equal(linear.generate(prompts(), 3, exit="fixed"), linear.generate(prompts(), 3))
    with pytest.raises(InputError, match="kv_sharing"):
        tiny_model(loops=2, attention="linear", kv_sharing=True)
    with pytest.raises(InputError, match="activation_checkpointing"):
        LoopedLM(config=make("looped-2x3", True).config, activation_checkpointing=True)
    assert math.isfinite(make("looped-2x3", True)(prompts()).sum().item())
