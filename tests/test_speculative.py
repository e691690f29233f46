"""Self-speculative decoding (``generate(..., draft_loops=n)``) against plain greedy decoding at L, token for token."""

import pytest
import torch

from conftest import tiny_model
from looped.decoding.speculative import SelfSpeculativeDecoder
from looped.model.cache import DecodeCache

VOCAB = 13
SHAPES = {
    "looped-2x3": dict(block_layers=2, loops=3),
    "middle-1+2x3+1-learned": dict(prelude_layers=1, block_layers=2, loops=3, coda_layers=1, pos_encoding="learned"),
    "injection-sparse-1x4": dict(
        block_layers=1,
        loops=4,
        input_injection="add",
        attention="sparse",
        mixer_options={"sparse": {"pattern": "local", "window": 5}},
    ),
}


def make(shape: str, init_std: float, seed: int = 0):
    fields = dict(vocab_size=VOCAB, max_seq_len=40, d_model=32, n_heads=4, d_ff=64, init_std=init_std)
    return tiny_model(seed, **fields, **SHAPES[shape])


def prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def speculate(model, ids, new, draft_loops, draft_tokens):
    loops = model.config.loops
    cache = DecodeCache(ids.shape[1] + new)
    decoder = SelfSpeculativeDecoder(model, draft_loops, loops, cache, draft_tokens)
    with torch.no_grad():
        first = model(ids, cache=cache)[:, -1].argmax(-1)
        return decoder.decode(first, new, None, None), decoder


# init_std 0.3: the draft rarely agrees (the rejection path); 0.05: it mostly does (the acceptance path).
@pytest.mark.parametrize("init_std", [0.3, 0.05])
@pytest.mark.parametrize("shape", SHAPES)
def test_self_speculative_tokens_equal_plain_greedy_at_full_depth(shape, init_std):
    model = make(shape, init_std)
    ids = prompt(3, 5)
    want = model.generate(ids, 20)
    for draft_loops in range(1, model.config.loops):
        for draft_tokens in (1, 3, 6):
            got = model.generate(ids, 20, draft_loops=draft_loops, draft_tokens=draft_tokens)
            assert torch.equal(got, want), (draft_loops, draft_tokens)


def test_both_paths_run_and_acceptance_is_counted():
    """A model whose last loops barely move the state keeps most drafts; a large-weight one rejects most."""
    ids = prompt(1, 4)
    _, agreeing = speculate(make("looped-2x3", 0.05), ids, 24, draft_loops=2, draft_tokens=4)
    _, disagreeing = speculate(make("looped-2x3", 0.3), ids, 24, draft_loops=1, draft_tokens=4)
    assert agreeing.drafted > 0 and 0 < agreeing.accepted <= agreeing.drafted
    assert disagreeing.accepted < disagreeing.drafted
    assert agreeing.accepted / agreeing.drafted > disagreeing.accepted / disagreeing.drafted


def test_self_speculative_keeps_eos_and_left_padding_rules():
    model = make("looped-2x3", 0.05)
    ids = prompt(3, 6, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :3] = mask[2, :1] = 0
    for eos_id in range(VOCAB):  # some token ends some rows early: the finished-row rule is exercised
        want = model.generate(ids, 16, eos_id=eos_id, attention_mask=mask)
        got = model.generate(ids, 16, eos_id=eos_id, attention_mask=mask, draft_loops=2, draft_tokens=3)
        assert torch.equal(got, want), eos_id


def test_draft_loops_that_cannot_be_exact_are_one_clear_line():
    cases = [
        (dict(block_layers=1, loops=3, attention="linear"), 1, "running sum that cannot drop"),
        (dict(block_layers=1, loops=3, kv_sharing=True), 1, "kv_sharing"),
        (dict(block_layers=1, loops=3), 3, r"pick 1\.\.2"),
        (dict(block_layers=1, loops=3), 0, r"pick 1\.\.2"),
    ]
    for fields, draft_loops, message in cases:
        model = tiny_model(vocab_size=VOCAB, max_seq_len=20, **fields)
        with pytest.raises(ValueError, match=message) as err:
            model.generate(prompt(1, 3), 4, draft_loops=draft_loops)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="drop exit"):
        tiny_model(vocab_size=VOCAB, loops=3).generate(prompt(1, 3), 4, draft_loops=1, exit="entropy_0.5")
