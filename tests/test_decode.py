"""Incremental decoding against the full forward: cached logits, greedy generation, causality of every mixer."""

import pytest
import torch

from conftest import tiny_model
from looped import LoopedTransformer
from looped.model.cache import DecodeCache

VOCAB, MAX_LEN = 13, 24

MIXERS = {
    "softmax": dict(attention="softmax"),
    "linear": dict(attention="linear", mixer_options={"linear": {"chunk_size": 4}}),
    "sparse-local": dict(attention="sparse", mixer_options={"sparse": {"pattern": "local", "window": 3}}),
    "sparse-strided": dict(attention="sparse", mixer_options={"sparse": {"pattern": "strided", "stride": 3}}),
    "sparse-fixed": dict(attention="sparse", mixer_options={"sparse": {"pattern": "fixed", "stride": 4}}),
    # the Llama family's settings: grouped-query attention, heads wider than d/h, Qwen's q/k norm and bias
    "softmax-gqa": dict(attention="softmax", n_kv_heads=2, head_width=16, qk_norm=True, qkv_bias=True),
    "hybrid": dict(
        attention=["linear", "sparse", "softmax"],
        mixer_options={"linear": {"chunk_size": 4}, "sparse": {"pattern": "local", "window": 5}},
    ),
}
SHAPES = {
    "plain-3x1": dict(block_layers=3, loops=1),
    "looped-2x3": dict(block_layers=2, loops=3),
    "middle-1+3x2+1": dict(prelude_layers=1, block_layers=3, loops=2, coda_layers=1),
    "relaxed-2x2": dict(block_layers=2, loops=2, lora_rank=3),  # per-loop LoRA: each loop's own W + B·A
}


def make(mixer: str, shape: str, pos_encoding: str = "rope") -> LoopedTransformer:
    model = build(mixer, shape, pos_encoding)
    if model.lora is not None:  # adapters that change every loop (fresh ones, B = 0, would change nothing)
        with torch.no_grad():
            for p in model.lora.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def build(mixer: str, shape: str, pos_encoding: str = "rope") -> LoopedTransformer:
    return tiny_model(
        vocab_size=VOCAB,
        max_seq_len=MAX_LEN,
        d_model=32,
        n_heads=4,
        d_ff=64,
        pos_encoding=pos_encoding,
        init_std=0.3,  # large weights: positions and tokens change the logits visibly
        **MIXERS[mixer],
        **SHAPES[shape],
    )


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pos_encoding", ["rope", "learned"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mixer", MIXERS)
def test_cached_decoding_equals_full_forward(mixer, shape, pos_encoding):
    model = make(mixer, shape, pos_encoding)
    ids = tokens(3, 20)
    cache = DecodeCache(capacity=20)
    # A 6-token prefill, a 5-token chunk (queries at an offset, several at once), then single steps.
    cuts = [0, 6, 11, *range(12, 21)]
    with torch.no_grad():
        full = model(ids)
        pieces = [model(ids[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:])]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 20
    assert len(cache.layers) == model.applications()  # one slot per layer application
    assert all(slot.offset == 20 for slot in cache.layers)


def greedy_reference(model, prompt, max_new_tokens, eos_id=None, loops=None):
    """Re-run the full forward on the growing sequence and take the argmax; no cache."""
    seq, p = prompt, prompt.shape[1]
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = model(seq, loops=loops)[:, -1].argmax(-1)
        if eos_id is not None:
            finished = (seq[:, p:] == eos_id).any(dim=1)
            token = torch.where(finished, torch.full_like(token, eos_id), token)
        seq = torch.cat([seq, token[:, None]], dim=1)
        if eos_id is not None and (seq[:, p:] == eos_id).any(dim=1).all():
            break
    return seq


@pytest.mark.parametrize("pos_encoding", ["rope", "learned"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mixer", MIXERS)
def test_generate_equals_slow_reference(mixer, shape, pos_encoding):
    model = make(mixer, shape, pos_encoding)
    prompt = tokens(4, 7, seed=2)
    out = model.generate(prompt, max_new_tokens=12)
    assert out.shape == (4, 19)
    assert torch.equal(out[:, :7], prompt)
    assert torch.equal(out, greedy_reference(model, prompt, 12))
    # More loops than trained: the cache follows the call's loop count.
    assert torch.equal(model.generate(prompt, 6, loops=4), greedy_reference(model, prompt, 6, loops=4))


@pytest.mark.parametrize("mixer", ["softmax", "hybrid"])
def test_generate_stops_at_eos_and_pads_finished_rows(mixer):
    model = make(mixer, "looped-2x3")
    prompt = tokens(4, 5, seed=3)
    free = model.generate(prompt, max_new_tokens=10)
    # An eos that row 0 emits early and at least one row emits later or never.
    eos_id = int(free[0, 6])
    out = model.generate(prompt, max_new_tokens=10, eos_id=eos_id)
    assert torch.equal(out, greedy_reference(model, prompt, 10, eos_id=eos_id))
    after = out[0, 5:]
    first = int((after == eos_id).nonzero()[0])
    assert (after[first:] == eos_id).all()  # a finished row keeps emitting eos
    # Every row finishes: decoding stops early.
    one = model.generate(prompt[:1], max_new_tokens=10, eos_id=eos_id)
    assert one.shape[1] == 5 + first + 1
    assert torch.equal(one, greedy_reference(model, prompt[:1], 10, eos_id=eos_id))


@pytest.mark.parametrize("mixer", MIXERS)
def test_every_mixer_is_causal_in_a_middle_looped_model(mixer):
    # test_model/test_linear_attention/test_sparse_attention cover softmax, linear and strided;
    # this adds local and fixed at model level, and every mixer with a prelude and a coda.
    model = make(mixer, "middle-1+3x2+1")
    ids = tokens(2, 18)
    with torch.no_grad():
        base = model(ids)
        for cut in (0, 5, 11, 17):
            changed = ids.clone()
            changed[:, cut] = (changed[:, cut] + 1) % VOCAB
            out = model(changed)
            torch.testing.assert_close(out[:, :cut], base[:, :cut], atol=1e-6, rtol=0)
            assert not torch.allclose(out[:, cut], base[:, cut])


def test_generation_past_max_seq_len_names_the_limit():
    model = make("softmax", "plain-3x1")
    with pytest.raises(ValueError, match="max_seq_len=24.*max_new_tokens to at most 14"):
        model.generate(tokens(1, 10), max_new_tokens=15)
    cache = DecodeCache(capacity=MAX_LEN)
    with torch.no_grad():
        model(tokens(1, 20), cache=cache)
        with pytest.raises(ValueError, match="max_seq_len"):
            model(tokens(1, 5), cache=cache)


def test_cache_is_bound_to_one_loop_count():
    model = make("softmax", "looped-2x3")
    cache = DecodeCache(capacity=10)
    with torch.no_grad():
        model(tokens(1, 4), cache=cache)
        with pytest.raises(ValueError, match="keep `loops` the same"):
            model(tokens(1, 1), loops=4, cache=cache)


def padded(rows: list[torch.Tensor], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths padded to one with arbitrary token ids (the mask must hide them), and the mask."""
    t = max(len(r) for r in rows)
    ids = tokens(len(rows), t, seed=99)  # junk at the padding: it must not matter
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(t - len(row), t) if side == "left" else slice(0, len(row))
        ids[i, cols], mask[i, cols] = row, 1
    return ids, mask


@pytest.mark.parametrize(
    "mixer, shape, pos_encoding",
    [(m, s, "rope") for m in MIXERS for s in SHAPES] + [(m, "middle-1+3x2+1", "learned") for m in MIXERS],
)
def test_padded_rows_equal_each_row_alone(mixer, shape, pos_encoding):
    """Left and right padding, full forward and cached decoding: each row's logits are those of the row alone."""
    model = make(mixer, shape, pos_encoding)
    rows = [tokens(1, n, seed=n)[0] for n in (17, 11, 6)]
    with torch.no_grad():
        alone = [model(row[None])[0] for row in rows]
        for side in ("left", "right"):
            ids, mask = padded(rows, side)
            out = model(ids, attention_mask=mask)
            for i, want in enumerate(alone):
                torch.testing.assert_close(out[i][mask[i].bool()], want, atol=1e-5, rtol=1e-5)
        # Left-padded prompts decoded with a cache: prefill of 9 columns, then one column per step.
        ids, mask = padded([torch.cat([r, tokens(1, 4, seed=7)[0]]) for r in rows])
        cache = DecodeCache(capacity=ids.shape[1])
        cuts = [0, 9, *range(10, ids.shape[1] + 1)]
        pieces = [model(ids[:, a:b], cache=cache, attention_mask=mask[:, :b]) for a, b in zip(cuts, cuts[1:])]
        cached = torch.cat(pieces, dim=1)
        full = model(ids, attention_mask=mask)
    # The last 4 columns are tokens in every row: cached equals full there and at every token before.
    torch.testing.assert_close(cached[mask.bool()], full[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixer", ["softmax", "linear", "sparse-fixed", "hybrid"])
def test_generate_left_padded_equals_each_prompt_alone(mixer):
    model = make(mixer, "middle-1+3x2+1")
    prompts = [tokens(1, n, seed=n)[0] for n in (8, 3, 5)]
    ids, mask = padded(prompts)
    out = model.generate(ids, max_new_tokens=9, attention_mask=mask)
    for i, prompt in enumerate(prompts):
        assert torch.equal(out[i, ids.shape[1] :], model.generate(prompt[None], 9)[0, len(prompt) :])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids, attention_mask=mask[:, 1:])
